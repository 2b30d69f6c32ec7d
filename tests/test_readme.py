"""The README's two commands are what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    setup_and_main, tests = blocks[0].strip(), blocks[1].strip()
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    setup = setup_and_main.rsplit(" && ", 1)[0]
    assert setup.startswith("pip install torch==2.13.0")
    assert ci == [setup, tests]
