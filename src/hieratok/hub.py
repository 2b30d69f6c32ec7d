"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` with the huggingface_hub file conventions.

A model directory holds ``config.json`` (the config dataclass plus ``model_type`` and the
library version) and ``model.safetensors`` (the weights; no pickle anywhere). ``from_pretrained``
takes a local directory or a Hub repo id (``org/name``): a repo's two files are downloaded into
``huggingface_hub``'s cache, or read from the cache alone when ``local_files_only=True`` or
``HF_HUB_OFFLINE=1``. ``push_to_hub`` uploads the same two files with a generated model card.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Type, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from .checkpoint import STATE_NAME
from .config import architecture_diff, config_from_dict, config_from_preset, config_to_dict
from .version import __version__

__all__ = ["PretrainedMixin", "CONFIG_NAME", "WEIGHTS_NAME", "EMA_NAME", "METRIC_FILES", "is_repo_id", "hub_offline",
           "resolve_pretrained_dir", "model_card", "as_torch_dtype", "check_state_dict", "state_dict_problems",
           "meta_shapes", "safetensors_shapes", "check_config_fits_weights", "write_model_dir", "read_json", "read_safetensors", "model_type_of", "load_ema_weights", "write_atomic"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
METRIC_FILES = ("metrics.json", "latents.json", "gen_metrics.json")  # evaluation results: eval recon / latents / gen
EMA_NAME = "ema.safetensors"  # a training checkpoint's averaged trained parameters (hieratok.train.ema)
M = TypeVar("M", bound="PretrainedMixin")


def is_repo_id(path_or_repo: str | os.PathLike) -> bool:
    """``org/name`` that is not a local path: what ``from_pretrained`` looks up on the Hub."""
    s = str(path_or_repo)
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).expanduser().exists()


def hub_offline(local_files_only: bool = False) -> bool:
    """True when downloads are off: ``local_files_only`` or ``HF_HUB_OFFLINE`` (read now, so setting
    it after ``huggingface_hub`` was imported counts too)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(local_files_only or constants.HF_HUB_OFFLINE or env)


def resolve_pretrained_dir(path_or_repo: str | os.PathLike, *, subfolder: Optional[str] = None,
                           revision: Optional[str] = None, cache_dir: Optional[str | os.PathLike] = None,
                           token: Optional[str | bool] = None, local_files_only: bool = False) -> Path:
    """The folder holding ``config.json`` and ``model.safetensors``: a local folder (``/subfolder``), or a
    Hub repo's files fetched by ``huggingface_hub`` into its cache (only from the cache when
    :func:`hub_offline`). Raises FileNotFoundError naming the missing repo, revision or file."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        d = p / subfolder if subfolder else p
        if not d.is_dir():
            raise FileNotFoundError(f"{p}: no subfolder {subfolder!r}")
        return d
    if not is_repo_id(path_or_repo):
        raise FileNotFoundError(f"{path_or_repo}: not a model directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, offline = str(path_or_repo), hub_offline(local_files_only)
    files = [f"{subfolder.strip('/')}/{n}" if subfolder else n for n in (CONFIG_NAME, WEIGHTS_NAME)]
    where = f"{repo} (revision {revision or 'main'})"
    off = f"downloads are off ({'local_files_only=True' if local_files_only else 'HF_HUB_OFFLINE=1'})"
    fetch = f"download it once online (`hf download {repo}`), or pass a folder holding {' and '.join(files)}"
    try:  # one snapshot: both files from the same commit
        snapshot = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, token=token,
                                          allow_patterns=files, local_files_only=offline, library_name="hieratok"))
    except LocalEntryNotFoundError as e:  # offline, or the Hub could not be reached
        why = off if offline else f"the Hub could not be reached ({' '.join(str(e).split())[:160]})"
        raise FileNotFoundError(f"{where} is not in the local Hub cache and {why}: {fetch}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no Hub repo {repo} (a private or gated one needs token= or `hf auth login`), "
                                "and no such local folder") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo} has no revision {revision!r}") from None
    for f in files:
        if not (snapshot / f).is_file():
            raise FileNotFoundError(
                f"{where}: {f} is not in the local Hub cache ({snapshot}) and {off}: {fetch}" if offline else
                f"{where}: the Hub repo has no {f}; it must hold {' and '.join(files)} (push_to_hub uploads both)")
    return (snapshot / files[0]).parent


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it over ``path``: a killed
    writer never leaves a truncated ``path`` (the name is per process, so ranks do not collide)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def model_type_of(directory: Path) -> Optional[str]:
    """The ``model_type`` recorded in a model folder's ``config.json``."""
    return read_json(Path(directory) / CONFIG_NAME).get("model_type")


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; FileNotFoundError / ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors file's header, without reading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _int_fields(config: Any) -> dict[str, int]:
    return {k: v for k, v in config_to_dict(config).items() if isinstance(v, int) and not isinstance(v, bool)}


def check_config_fits_weights(model_cls: Any, config: Any, weights: Path) -> None:
    """Compare a config with a weight file's header before any model is built (an absurd or foreign
    ``config.json`` must not cost memory): every ``*depth*`` field is at most the file's tensor count
    (each block holds tensors), then the shapes of a model built on the meta device must match."""
    shapes = safetensors_shapes(weights)
    for key, value in _int_fields(config).items():
        if "depth" in key and value > len(shapes):
            raise ValueError(f"config {key}={value} does not fit {weights}, which holds {len(shapes)} tensors: "
                             f"the config and the weights belong to different models")
    problems = state_dict_problems(shapes, meta_shapes(model_cls, config), limit=5)
    if problems:
        raise ValueError(f"weights in {weights} do not fit the config: " + " | ".join(problems))


def load_ema_weights(model: torch.nn.Module, path: Path) -> None:
    """Load an EMA file (one tensor per trained parameter, as the trainer saves it) into ``model``;
    buffers and frozen parameters keep their values. Every trained parameter must be in it."""
    ema = read_safetensors(path)
    want = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    problems = state_dict_problems({k: v.shape for k, v in ema.items()}, want, limit=5)
    if problems:
        raise ValueError(f"EMA weights in {path} do not fit this model: " + " | ".join(problems))
    model.load_state_dict({**model.state_dict(), **ema})


def state_dict_problems(got: Mapping[str, Sequence[int]], want: Mapping[str, Sequence[int]], *,
                        limit: Optional[int] = None, labels: Optional[Mapping[str, str]] = None) -> list[str]:
    """The missing / unexpected / mis-shaped parts of an error comparing tensor shapes (``got``,
    e.g. a checkpoint) with a model's (``want``); empty when they fit.

    ``limit`` shortens each list; ``labels`` names a missing key differently (e.g. with its
    official name). Shared by :func:`check_state_dict` and the checkpoint converters.
    """
    def show(items: list[str]) -> str:
        cut = items if limit is None else items[:limit]
        return f"({len(items)}): {cut}{' ...' if len(cut) < len(items) else ''}"

    labels = labels or {}
    missing = sorted(labels.get(k, k) for k in want if k not in got)
    unexpected = sorted(k for k in got if k not in want)
    shapes = [f"{k}: checkpoint {tuple(got[k])} vs model {tuple(want[k])}"
              for k in sorted(want) if k in got and tuple(got[k]) != tuple(want[k])]
    return [f"{what} {show(items)}" for what, items in
            (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]


def meta_shapes(model_cls: Any, config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of ``model_cls(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
    problems = state_dict_problems({k: v.shape for k, v in sd.items()},
                                   {k: v.shape for k, v in model.state_dict().items()}, limit=5)
    if problems:
        raise ValueError(f"weights in {where} do not fit this model: " + " | ".join(problems))


def write_model_dir(directory: str | os.PathLike, model: Any,
                    state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """The one writer of a model folder: ``config.json`` (``model.config`` plus ``model_type`` and
    the library version) and ``model.safetensors`` (``state_dict``, e.g. gathered from shards by the
    trainer; else the model's own), each written atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"model_type": model.model_type, "hieratok_version": __version__, **config_to_dict(model.config)}
    write_atomic(d / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    if state_dict is None:
        write_atomic(d / WEIGHTS_NAME, lambda p: save_model(model, str(p)))
    else:
        write_atomic(d / WEIGHTS_NAME, lambda p: save_file({k: v.contiguous() for k, v in state_dict.items()}, str(p)))
    return d


def as_torch_dtype(torch_dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """A floating torch dtype from a dtype or its name (``"bfloat16"``, ``"float16"``, ``"float32"``)."""
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point:
        return torch_dtype
    dt = getattr(torch, torch_dtype.removeprefix("torch."), None) if isinstance(torch_dtype, str) else None
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating torch dtype such as torch.bfloat16 or 'float16', got {torch_dtype!r}")
    return dt


def _cell(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text.replace("|", "\\|")


def _metric_files(source_dir: Optional[Path]) -> list[Path]:
    """The evaluation results kept beside a model folder (``source_dir`` or its ``eval/``)."""
    if source_dir is None:
        return []
    found = {name: d / name for d in (source_dir, source_dir / "eval") for name in METRIC_FILES if (d / name).is_file()}
    return [found[n] for n in METRIC_FILES if n in found]


def model_card(model: Any, repo_id: str, *, source_dir: Optional[str | os.PathLike] = None,
               license: str = "apache-2.0", tags: Sequence[str] = ()) -> str:
    """The README.md of a pushed model: YAML metadata, the model's type, size and config, its training
    recipe (``trainer_state.json`` in ``source_dir``) and its evaluation (``metrics.json``,
    ``latents.json``, ``gen_metrics.json`` in ``source_dir`` or ``source_dir/eval``, with their
    protocol and the sources of the evaluation networks' weights)."""
    import yaml

    src = Path(source_dir) if source_dir is not None else None
    cls = type(model)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {"library_name": "hieratok", "license": license,
            "tags": list(dict.fromkeys(["hieratok", model.model_type, "pytorch", *tags]))}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo_id.split('/')[-1]}", "",
             f"A `{model.model_type}` model (`{cls.__module__}.{cls.__qualname__}`) saved with hieratok {__version__}.", "",
             "```python", "from hieratok.registry import load_model", "",
             f'model, info = load_model("{repo_id}")  # or {cls.__name__}.from_pretrained("{repo_id}")', "```", "",
             "## Model", "", "| | |", "|---|---|", f"| model type | `{model.model_type}` |",
             f"| parameters | {n_params / 1e6:.2f}M ({n_params:,}) |", f"| weights | {WEIGHTS_NAME} |", "",
             "## Configuration", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in config_to_dict(model.config).items()]
    state = read_json(src / STATE_NAME) if src is not None and (src / STATE_NAME).is_file() else None
    if state is not None:
        tc = state.get("train_config", {})
        lines += ["", "## Training", "", f"Trained for {state.get('step', '?')} steps (epoch {state.get('epoch', '?')})"
                  + (f", task `{tc['task']}`, preset `{tc.get('preset')}`." if "task" in tc else "."),
                  "", "The full training config (`trainer_state.json`):", "", "```yaml",
                  yaml.safe_dump(tc, sort_keys=False).strip(), "```"]
    else:
        lines += ["", "## Training", "", "Not recorded (pushed without a training checkpoint's trainer_state.json)."]
    for f in _metric_files(src):
        m = read_json(f)
        results = {k: v for k, v in m.items() if k not in ("protocol", "checkpoint") and not k.endswith(("_source", "_note"))}
        lines += ["", f"## Evaluation ({f.name})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {_cell(v)} |" for k, v in results.items()]
        notes = {k: v for k, v in m.items() if k.endswith(("_source", "_note"))}
        if notes:
            lines += ["", "Weight sources and notes: " + "; ".join(f"{k}: {v}" for k, v in notes.items()) + "."]
        if isinstance(m.get("protocol"), dict):
            lines += ["", "Protocol:", "", "```json", json.dumps(m["protocol"], indent=1), "```"]
    return "\n".join(lines) + "\n"


class PretrainedMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` to an ``nn.Module`` built from ``self.config``."""

    config_class: ClassVar[Type[Any]]
    model_type: ClassVar[str]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}  # name -> config field values (hieratok.presets)

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(cls.presets)

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> Any:
        """The config of preset ``name`` with field ``overrides``; a ValueError naming the choices."""
        return config_from_preset(cls.config_class, cls.presets, name, overrides, cls.__name__)

    @classmethod
    def from_preset(cls: Type[M], name: str, **overrides: Any) -> M:
        """A new model (random initialisation) of preset ``name`` with config field ``overrides``."""
        return cls(cls.preset_config(name, **overrides))

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (created if needed)."""
        return write_model_dir(save_directory, self)

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> Any:
        """Read and validate ``config.json`` of a saved model."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
        meta = read_json(path)
        mt = meta.pop("model_type", None)
        meta.pop("hieratok_version", None)
        if mt != cls.model_type:
            raise ValueError(f"{path}: model_type is {mt!r}, expected {cls.model_type!r}")
        return config_from_dict(cls.config_class, meta)

    def push_to_hub(self, repo_id: str, *, source_dir: Optional[str | os.PathLike] = None, subfolder: Optional[str] = None,
                    private: Optional[bool] = None, token: Optional[str] = None, revision: Optional[str] = None,
                    commit_message: Optional[str] = None, create_pr: bool = False, license: str = "apache-2.0",
                    tags: Sequence[str] = ()) -> Any:
        """Upload this model to the Hub repo ``repo_id`` (created if needed): ``config.json``,
        ``model.safetensors`` (:func:`write_model_dir`), a model card ``README.md`` (:func:`model_card`)
        and the evaluation results found in ``source_dir`` (the folder the model came from, e.g. a
        training checkpoint; its ``trainer_state.json`` gives the card's training section).

        Args:
            subfolder: a folder inside the repo (several models in one repo); the card goes there too.
            revision: a branch, created from main if missing.

        Returns:
            ``huggingface_hub``'s ``CommitInfo`` (``.commit_url``, ``.oid``).
        """

        from huggingface_hub import HfApi

        if source_dir is not None and not Path(source_dir).is_dir():
            raise FileNotFoundError(f"source_dir {source_dir}: no such folder")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hieratok-push-") as tmp:
            d = write_model_dir(tmp, self)
            for f in _metric_files(Path(source_dir) if source_dir is not None else None):
                shutil.copyfile(f, d / f.name)
            (d / "README.md").write_text(model_card(self, repo_id, source_dir=source_dir, license=license, tags=tags))
            return api.upload_folder(repo_id=repo_id, folder_path=str(d), path_in_repo=subfolder, revision=revision,
                                     create_pr=create_pr, commit_message=commit_message or f"Upload {self.model_type} model")

    @classmethod
    def from_pretrained(
        cls: Type[M],
        path_or_repo: str | os.PathLike,
        *,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Optional[str | os.PathLike] = None,
        token: Optional[str | bool] = None,
        local_files_only: bool = False,
        torch_dtype: Optional[str | torch.dtype] = None,
        map_location: str | torch.device = "cpu",
        **overrides: Any,
    ) -> M:
        """Load a saved model from a folder or a Hub repo id, in eval mode (as transformers and
        diffusers return theirs: posterior mode, no drop-path).

        Args:
            path_or_repo: a folder with ``config.json`` and ``model.safetensors``, or ``org/name``:
                downloaded into ``huggingface_hub``'s cache, or read from it alone with
                ``local_files_only=True`` or ``HF_HUB_OFFLINE=1``.
            subfolder: the model's folder inside the folder or repo.
            revision, cache_dir, token: as in ``huggingface_hub.snapshot_download``.
            torch_dtype: cast the floating parameters and buffers (e.g. ``torch.bfloat16``) after loading.
            overrides: runtime config fields (e.g. ``attn_backend="reference"``); overriding a field that
                changes the weights (width, scales, ...) is an error naming the field and both values.
        """
        dtype = as_torch_dtype(torch_dtype)
        d = resolve_pretrained_dir(path_or_repo, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                                   token=token, local_files_only=local_files_only)
        saved = cls.read_config(d)
        cfg = config_from_dict(cls.config_class, {**config_to_dict(saved), **overrides}) if overrides else saved
        diff = architecture_diff(saved, cfg)
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{d} was saved with a different architecture ({desc})")
        check_config_fits_weights(cls, cfg, d / WEIGHTS_NAME)
        model = cls(cfg).to(map_location)
        model.load_pretrained_weights(d, map_location=map_location)
        return (model if dtype is None else model.to(dtype)).eval()

    def load_pretrained_weights(self, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> None:
        """Load ``model.safetensors`` from ``directory`` into this model, checking the config first."""
        d = Path(directory)
        diff = architecture_diff(self.read_config(d), self.config)
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{d} holds weights of another configuration ({desc})")
        path = d / WEIGHTS_NAME
        sd = read_safetensors(path, map_location)
        check_state_dict(self, sd, str(path))
        self.load_state_dict(sd)
