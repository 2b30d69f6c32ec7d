import json
import subprocess
import sys

from hieratok.cli import main, parse_overrides


def test_parse_overrides():
    assert parse_overrides(["scales=[1,4,16]", "downsample=interp", "latent_channels=32"]) == {
        "scales": [1, 4, 16], "downsample": "interp", "latent_channels": 32}


def test_info_json_matches_paper_shape(capsys):
    assert main(["info", "hieratok-f16d16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["decoder_tokens"] == 341 and info["encoder_tokens"] == 256
    assert abs(info["params"]["total"] / 401.18e6 - 1) < 0.03


def test_info_bad_override_is_one_line_error(capsys):
    assert main(["info", "tiny", "scales=[1,3]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scales [1, 3] must end at the full grid 8" in err


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "hieratok", "info", "tiny"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "decoder 85" in r.stdout
