"""ResTok tokenizer and HAR generator: ours against the authors' implementation, same weights, one run.

    python benchmarks/bench_restok_vs_official.py --official /tmp/restok-official [--batch 4] [--json out.json]
    python benchmarks/bench_restok_vs_official.py --official /tmp/restok-official --precision bf16 --only sampling

``--official`` is a local checkout of github.com/Kwai-Kolors/ResTok (never vendored here; its
commit is read from ``git`` or from a ``.commit`` file next to it). The script

1. imports the authors' model classes from that checkout (``modeling/restok.py``,
   ``autoregressive/models/gpt_har.py``, ``gpt_vanilla.py``, ``generate.py``);
2. builds the release configurations from the checkout's own inference config
   (``configs/infer/ResTok/llamagen_l_c2i_restok_l_128.yaml``: the ``restok_l_128`` tokenizer and
   the GPT-L HAR generator) with seeded random weights (their init; the GPT's zero-initialised
   output head and all other weights are re-drawn so that logits are not constant);
3. converts those weights into our modules with our converters
   (:func:`hieratok.convert.restok.convert_restok_checkpoint`,
   :func:`hieratok.convert.llamagen.convert_llamagen_state_dict`);
4. checks that the outputs agree (codes of ``encode``, images of ``decode``, and the codes of
   HAR / token-by-token sampling drawn from the same random stream; see "Parity" below);
5. times, under ``torch.inference_mode`` and ``torch.set_num_threads(--threads)``, interleaved
   round by round after a warm-up: tokenizer encode (theirs: ``encode``; ours: ``encode_indices``,
   the codes-only call users run for code extraction, which skips the image rows of the last
   encoder layer that only the training-time alignment loss reads) and decode of a batch (256 x 256), HAR
   sampling of a batch with CFG (the published setting: cfg 3.75, "step" schedule from 0.25,
   top-p 0.95) and token-by-token AR sampling with the same weights for reference;
6. prints a table (official s, ours s, speed-up) and optionally writes JSON;
7. with ``--only gradients`` (no timing): training-mode gradient parity. Both models in train
   mode, no nested dropout, one batch, loss = the release's L2 on [0, 1] images + its quantizer
   loss (codebook + 0.25 commitment); every gradient of ours is compared with theirs (mapped by
   the weight converter), relative to that tensor's largest gradient. The float32 noise floor is
   ours against ours with the fast paths off (:func:`gradient_parity`).

Import shims (run time only, never written to disk). The authors' code imports third-party
modules that are not dependencies of hieratok. Each one below is put into ``sys.modules`` only
when the real package is not importable, and the JSON records which were shimmed:

* ``timm`` (needs torchvision, which is unusable here): their model code uses only
  ``timm.layers.Mlp`` (Linear - GELU - Linear with timm's ``fc1``/``fc2`` names, re-implemented
  here), ``DropPath`` (identity: inference only), ``use_fused_attn`` (True), ``PatchEmbed`` (only
  built without the CNN front end, which the release does not use; ours raises),
  ``timm.models.layers.trunc_normal_`` (``torch.nn.init.trunc_normal_``) and the ImageNet
  mean / std constants of ``timm.data``.
* ``accelerate.utils.operations.gather``: identity (single process).
* ``einops.rearrange`` / ``einops.layers.torch.Rearrange``: a small re-implementation of the
  pattern syntax they use (named axes, parenthesised groups, literal ``1``).
* ``omegaconf.OmegaConf``: ``create`` (dicts and dataclasses -> attribute dicts, ``${a.b}``
  interpolations resolved) and ``to_container``.

Their ``modeling/modules/__init__.py`` imports the training losses (torchvision); the packages
``modeling``, ``modeling.modules``, ``modeling.quantizer``, ``autoregressive``,
``autoregressive.models`` and ``utils`` are therefore registered as bare packages over the
checkout's folders, so that only the model files themselves are executed.

Parity. Encode: identical code indices (a mismatch can only come from a near-tie of two
codebook distances; the script reports the distance gap of any mismatch). Decode: relative max
error of the images. Sampling: both samplers draw every code with ``torch.multinomial`` over a
(rows, V) probability matrix in the same row order, so with the same seed they consume the same
random stream and must return the same codes (checked once sampled and once greedy). Both
sides use the release's CFG "step" schedule as its published sampling script
(``autoregressive/sample/sample_c2i_ddp_cfg_search.py``) runs it: for the HAR generator the
script puts ``num_steps = a + log2(N) - log2(a)`` (9) into the schedule kwargs, so the ratio of
pass g is ``g / (num_steps - 1)``; for the plain next-token generator it sets no ``num_steps``
(ours: ``cfg_schedule="step-release"``, :func:`hieratok.generators.autoregressive.release_step_scales`; the
unguided scale is ``min_cfg_scale + 1e-4``). The script records the scale their sampler used at
every forward pass (by wrapping their ``step_schedule``) and checks that ours used the same.

Precision (``--precision``). ``fp32`` (the default) is everything above. ``bf16`` runs each
side's HAR sampler the way its released sampler runs it in bf16, and the tokenizer rows stay fp32:

* theirs: the published sampling script (``--precision bf16``, its default) casts the GPT's
  weights to bfloat16 (``model.to(dtype=torch.bfloat16)``) and uses no autocast, so the KV cache
  and activations are bf16; their RMSNorm and RoPE compute in float32 and cast back, and the
  logits are cast to float32 before CFG and sampling. Their tokenizer stays float32.
* ours: ``hieratok sample --precision bf16`` (:mod:`hieratok.precision`): float32 weights under
  ``torch.autocast(dtype=torch.bfloat16)`` around the sampler (matmuls in bf16, our KV cache
  float32), logits float32.

The fp32 parity checks run first, as with ``--precision fp32``, and keep their sampled codes.
Then each side samples again in bf16 with the same seed, and the script reports how many codes
agree, position by position: ours bf16 with ours fp32, theirs bf16 with theirs fp32, ours bf16
with theirs bf16. A sampled sequence conditions on its own earlier codes, so after the first
differing code the rest of that row mostly differs too; the first differing position of each row
is reported as well. Token-by-token AR is timed in fp32 only. A CPU without AVX512-BF16 or
AMX-BF16 emulates bf16 (the script prints and records it): bf16 timings from such a CPU say
nothing about bf16 where it is native.

Legend: B batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import math
import re
import subprocess
import sys
import types
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Samples, machine_info, print_table, time_once, wait_for_quiet, write_json  # noqa: E402

from hieratok.convert.llamagen import convert_llamagen_state_dict  # noqa: E402
from hieratok.convert.restok import convert_restok_checkpoint, infer_restok_config  # noqa: E402
from hieratok.generators.autoregressive import ar_layout, har_layout, sample_layout  # noqa: E402
from hieratok.generators.llamagen import GPT, GPTConfig  # noqa: E402
from hieratok.machine import keep_freed_memory  # noqa: E402
from hieratok.precision import inference_precision, native_on_cpu, resolve_precision  # noqa: E402
from hieratok.tokenizers.restok import ResTok  # noqa: E402

INFER_CONFIG = "configs/infer/ResTok/llamagen_l_c2i_restok_l_128.yaml"
PUBLISHED = dict(cfg_scale=3.75, cfg_start=0.25, top_p=0.95, min_cfg_scale=1.0)  # README's FID command
AR_TOKEN_NUM = 4  # next-token codes before the HAR levels (the config's num_min_tokens)
PRECISION_REGIMES = {  # how each side's released sampler runs the GPT at that precision
    "fp32": {"official": "float32", "ours": "float32", "tokenizer": "float32"},
    "bf16": {"official": "GPT weights cast to bfloat16 (model.to(dtype=torch.bfloat16)), bf16 KV cache, float32 logits; "
                         "no autocast (their sampling script's --precision bf16)",
             "ours": "float32 weights under torch.autocast(bfloat16) around sample_layout, float32 KV cache and "
                     "logits (hieratok sample --precision bf16)",
             "tokenizer": "float32 on both sides (their sampling script decodes in float32)"},
}


# ---------------------------------------------------------------------------------------------
# import shims (see the module docstring)
# ---------------------------------------------------------------------------------------------


def _module(name: str, **attrs: Any) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


class _TimmMlp(nn.Module):
    """timm.layers.Mlp as their blocks build it: fc1 -> act -> fc2 (dropout is off at inference)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable[[], nn.Module] = nn.GELU,
                 drop: float = 0.0, **_: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _NoPatchEmbed(nn.Module):
    def __init__(self, *_: Any, **__: Any) -> None:
        raise NotImplementedError("timm PatchEmbed is not shimmed (the release uses the CNN front end)")


def _parse_axes(side: str) -> list[list[str]]:
    groups, cur = [], None
    for tok in re.findall(r"\(|\)|[A-Za-z_][A-Za-z0-9_]*|\d+", side):
        if tok == "(":
            cur = []
        elif tok == ")":
            groups.append(cur)
            cur = None
        elif cur is not None:
            cur.append(tok)
        else:
            groups.append([tok])
    return groups


def _rearrange(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """einops.rearrange for named axes, parenthesised groups and literal 1 (no ellipsis)."""
    left, right = (_parse_axes(s) for s in pattern.split("->"))
    if len(left) != x.ndim:
        raise ValueError(f"pattern {pattern!r} does not fit a tensor of {x.ndim} dims")
    known = dict(sizes)
    for group, n in zip(left, x.shape):
        names = [a for a in group if not a.isdigit()]
        fixed = math.prod(int(a) for a in group if a.isdigit()) * math.prod(known[a] for a in names if a in known)
        free = [a for a in names if a not in known]
        if len(free) > 1:
            raise ValueError(f"cannot infer {free} in {pattern!r}")
        if free:
            known[free[0]] = n // fixed
    order = [a for g in left for a in g if not a.isdigit()]
    flat = x.reshape([known[a] for a in order])
    out_names = [a for g in right for a in g if not a.isdigit()]
    flat = flat.permute([order.index(a) for a in out_names])
    return flat.reshape([math.prod(1 if a.isdigit() else known[a] for a in g) for g in right])


class _Rearrange(nn.Module):
    def __init__(self, pattern: str, **sizes: int) -> None:
        super().__init__()
        self.pattern, self.sizes = pattern, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rearrange(x, self.pattern, **self.sizes)


class _Cfg(dict):
    """Attribute access to a nested dict (what their code uses of OmegaConf's DictConfig)."""

    def __getattr__(self, k: str) -> Any:
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __getitem__(self, k: str) -> Any:
        v = dict.__getitem__(self, k)
        return _Cfg(v) if isinstance(v, dict) and not isinstance(v, _Cfg) else v

    def get(self, k: str, default: Any = None) -> Any:
        return self[k] if k in self else default


def _resolve(tree: Any, root: Optional[dict] = None) -> Any:
    """Resolve ``${a.b.c}`` interpolations (whole-value references only)."""
    root = tree if root is None else root
    if isinstance(tree, dict):
        return {k: _resolve(v, root) for k, v in tree.items()}
    if isinstance(tree, str) and (m := re.fullmatch(r"\$\{([\w.]+)\}", tree)):
        v: Any = root
        for part in m.group(1).split("."):
            v = v[part]
        return _resolve(v, root)
    return tree


class _OmegaConf:
    @staticmethod
    def create(obj: Any) -> _Cfg:
        if dataclasses.is_dataclass(obj):
            obj = dataclasses.asdict(obj)
        return _Cfg(_resolve(dict(obj)))

    @staticmethod
    def to_container(cfg: Any) -> dict:
        return {k: _OmegaConf.to_container(v) if isinstance(v, dict) else v for k, v in cfg.items()}


def _shim_modules() -> dict[str, dict[str, types.ModuleType]]:
    from torch.nn.init import trunc_normal_

    def noop_gather(x: Any) -> Any:
        return x

    def fused() -> bool:
        return True

    timm = {
        "timm": _module("timm"),
        "timm.layers": _module("timm.layers", Mlp=_TimmMlp, DropPath=lambda *a, **k: nn.Identity(),
                               PatchEmbed=_NoPatchEmbed, use_fused_attn=fused),
        "timm.layers.mlp": _module("timm.layers.mlp", Mlp=_TimmMlp),
        "timm.layers.drop": _module("timm.layers.drop", DropPath=lambda *a, **k: nn.Identity()),
        "timm.models": _module("timm.models"),
        "timm.models.layers": _module("timm.models.layers", trunc_normal_=trunc_normal_),
        "timm.data": _module("timm.data", IMAGENET_DEFAULT_MEAN=(0.485, 0.456, 0.406),
                             IMAGENET_DEFAULT_STD=(0.229, 0.224, 0.225)),
    }
    return {
        "timm": timm,
        "accelerate": {
            "accelerate": _module("accelerate"),
            "accelerate.utils": _module("accelerate.utils"),
            "accelerate.utils.operations": _module("accelerate.utils.operations", gather=noop_gather),
        },
        "einops": {
            "einops": _module("einops", rearrange=_rearrange),
            "einops.layers": _module("einops.layers"),
            "einops.layers.torch": _module("einops.layers.torch", Rearrange=_Rearrange),
        },
        "omegaconf": {"omegaconf": _module("omegaconf", OmegaConf=_OmegaConf)},
    }


# ---------------------------------------------------------------------------------------------
# loading the official code
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Official:
    root: Path
    commit: Optional[str]
    shimmed: list[str]
    restok: types.ModuleType
    gpt_har: types.ModuleType
    gpt_vanilla: types.ModuleType
    generate: types.ModuleType
    config: Any


def _commit_of(root: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    f = root / ".commit"
    return f.read_text().strip() if f.is_file() else None


def load_official(path: str) -> Official:
    """Import the authors' model code from a checkout (shims only for modules that are missing)."""
    root = Path(path).expanduser().resolve()
    if not all((root / f).is_file() for f in ("modeling/restok.py", "autoregressive/models/gpt_har.py")):
        raise SystemExit(f"{root} is not a checkout of Kwai-Kolors/ResTok (no modeling/restok.py)")
    shimmed = []
    for name, mods in _shim_modules().items():
        if importlib.util.find_spec(name) is None:
            sys.modules.update(mods)
            shimmed.append(name)
    packages = ("modeling", "modeling.modules", "modeling.quantizer", "autoregressive", "autoregressive.models", "utils")
    for pkg in packages:
        m = types.ModuleType(pkg)
        m.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules[pkg] = m
    sys.path.insert(0, str(root))
    import yaml

    omegaconf = importlib.import_module("omegaconf")
    raw = yaml.safe_load((root / INFER_CONFIG).read_text())
    cfg = omegaconf.OmegaConf.create(raw if "omegaconf" not in shimmed else _resolve(raw))
    return Official(root, _commit_of(root), shimmed,
                    importlib.import_module("modeling.restok"),
                    importlib.import_module("autoregressive.models.gpt_har"),
                    importlib.import_module("autoregressive.models.gpt_vanilla"),
                    importlib.import_module("autoregressive.models.generate"), cfg)


class ScaleRecorder:
    """Wraps their ``step_schedule`` and records the guidance scale of every forward pass."""

    def __init__(self, generate_module: types.ModuleType) -> None:
        self.mod, self.orig, self.scales = generate_module, generate_module.step_schedule, []

    def __enter__(self) -> "ScaleRecorder":
        def wrapped(*a: Any, **k: Any) -> float:
            s = self.orig(*a, **k)
            self.scales.append(float(s))
            return s

        self.mod.step_schedule = wrapped
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mod.step_schedule = self.orig


# ---------------------------------------------------------------------------------------------
# models with the same weights
# ---------------------------------------------------------------------------------------------


def build_tokenizers(off: Official, seed: int, **overrides: Any) -> tuple[nn.Module, ResTok]:
    """Their released tokenizer with random weights and ours converted from it, both in eval mode;
    ``overrides``: fields of our config (the training check turns nested dropout off)."""
    torch.manual_seed(seed)
    theirs = off.restok.ResTok(off.config).eval()
    sd = theirs.state_dict()
    cfg = dataclasses.replace(infer_restok_config(sd, image_size=off.config.dataset.preprocessing.crop_size), **overrides)
    ours = ResTok(cfg)
    ours.load_state_dict(convert_restok_checkpoint(sd, cfg))
    return theirs, ours.eval()


def _randomize_gpt(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def gpt_config_of(official_args: Any, num_placeholders: int) -> GPTConfig:
    return GPTConfig(vocab_size=official_args.vocab_size, dim=official_args.dim, depth=official_args.n_layer,
                     num_heads=official_args.n_head, num_classes=official_args.num_classes,
                     num_placeholders=num_placeholders, ffn_multiple_of=official_args.multiple_of,
                     ffn_dim_multiplier=official_args.ffn_dim_multiplier, norm_eps=official_args.norm_eps,
                     rope_base=float(official_args.rope_base))


def build_gpts(off: Official, seed: int, vanilla: bool) -> tuple[nn.Module, GPT]:
    """Their GPT-L (HAR, or the plain next-token model) and ours with the same random weights."""
    torch.manual_seed(seed)
    models = off.gpt_vanilla.GPT_models if vanilla else off.gpt_har.GPT_models
    theirs = models[off.config.model.generator.model_type](off.config).eval()
    _randomize_gpt(theirs, seed)
    cfg = gpt_config_of(theirs.config, 0 if vanilla else theirs.spe_token_num)
    ours = GPT(cfg)
    ours.load_state_dict(convert_llamagen_state_dict(theirs.state_dict(), cfg))
    return theirs, ours.eval()


def share_gpt_weights(src: nn.Module, vanilla: nn.Module) -> None:
    """Give their vanilla GPT the HAR model's weights (all but the placeholder table)."""
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("spe_tok_embeddings.")}
    missing, unexpected = vanilla.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith(("kv_cache.k_cache", "kv_cache.v_cache"))]:
        raise RuntimeError(f"vanilla GPT does not take the HAR weights: missing {missing}, unexpected {unexpected}")


# ---------------------------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------------------------


def timed(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, wait_quiet: float) -> dict[str, Samples]:
    """Interleaved rounds (every variant once per round) after ``warmup`` rounds; with
    ``wait_quiet`` > 0 each round first waits (up to that many seconds) for other processes to
    leave the CPUs alone."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {k: Samples() for k in fns}
    for r in range(rounds):
        if wait_quiet > 0:
            wait_for_quiet(wait_quiet)
        for k, fn in fns.items():
            time_once(fn, "cpu", out[k])
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v.seconds[-1]:.3f}s (others {v.other_cpu[-1] or 0:.0%})" for k, v in out.items()), flush=True)
    return out


def _row(what: str, res: dict[str, Samples], official: str, ours: str, per: int = 1,
         reference: Optional[str] = None) -> dict:
    o, u = res[official].summary(), res[ours].summary()
    row = {"what": what, "official": o["median"] / per, "ours": u["median"] / per, "speedup": o["median"] / u["median"],
           "official_min": o["min"] / per, "ours_min": u["min"] / per, "speedup_min": o["min"] / u["min"], "n": o["n"],
           "other_cpu": max(o["other_cpu_median"], u["other_cpu_median"]),
           "samples": {k: res[k].seconds for k in (official, ours, reference) if k}}
    if reference:
        r = res[reference].summary()
        row["ours_reference_paths"] = r["median"] / per
    return row


def tokenizer_section(off: Official, args: argparse.Namespace) -> tuple[list[dict], dict]:
    theirs, ours = build_tokenizers(off, args.seed)
    x01 = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(args.seed))
    x = x01 * 2 - 1
    parity: dict[str, Any] = {}
    with torch.inference_mode():
        zq, rd = theirs.encode(x01)
        idx_t = rd["min_encoding_indices"].reshape(args.batch, -1)
        enc = ours.encode(x)
        idx_o = ours.encode_indices(x)  # the timed call: codes only
        parity["encode_indices_equal_full_encode"] = bool(torch.equal(idx_o, enc["indices"]))
        same = idx_t == idx_o
        parity["encode_codes_identical"] = f"{int(same.sum())}/{same.numel()}"
        if not bool(same.all()):  # how close were the competing codebook distances?
            d = rd["distances"].reshape(args.batch, -1, idx_t.shape[1]).transpose(1, 2)  # (B, N, K)
            gap = (d.gather(-1, idx_o[..., None]) - d.gather(-1, idx_t[..., None])).squeeze(-1)[~same]
            parity["encode_mismatch_distance_gap_max"] = float(gap.abs().max())
        lat_t = zq.reshape(args.batch, zq.shape[1], -1).transpose(1, 2)
        parity["encode_quantized_max_abs_diff"] = float((lat_t - enc["quantized"]).abs().max())
        img_t = theirs.decode_tokens(idx_t.long())
        img_o = ours.decode_indices(idx_t.long())
        parity["decode_rel_max_err"] = float(((img_o + 1) / 2 - img_t).abs().max() / img_t.abs().max())
    print(f"tokenizer parity: {parity}", flush=True)
    codes = idx_t.long()

    def with_paths(fast: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            ours.set_fast_paths(fast)
            return fn()
        return run

    fns = {
        "encode official": lambda: theirs.encode(x01),
        "encode ours": with_paths(True, lambda: ours.encode_indices(x)),
        "decode official": lambda: theirs.decode_tokens(codes),
        "decode ours": with_paths(True, lambda: ours.decode_indices(codes)),
    }
    if args.reference_paths:
        fns["encode ours (reference paths)"] = with_paths(False, lambda: ours.encode_indices(x))
        fns["decode ours (reference paths)"] = with_paths(False, lambda: ours.decode_indices(codes))
    with torch.inference_mode():
        res = timed(fns, args.repeats, 1, args.wait_quiet)
    ours.set_fast_paths(True)
    ref = " (reference paths)" if args.reference_paths else None
    rows = [_row(f"tokenizer {w}, per image (batch {args.batch})", res, f"{w} official", f"{w} ours", args.batch,
                 f"{w} ours{ref}" if ref else None) for w in ("encode", "decode")]
    theirs = ours = None  # free both models before the next stage
    return rows, parity


def script_schedule_kwargs(har: bool, num_tokens: int, ar_token_num: int = AR_TOKEN_NUM) -> dict[str, Any]:
    """The ``cfg_schedule_kwargs`` their sampling script builds for ``--cfg-schedule step``: for a
    HAR generator ``num_steps`` (forward passes, ``a + log2(N) - log2(a)``) first, then the window
    start and the minimal scale."""
    kwargs: dict[str, Any] = {}
    if har:
        kwargs["num_steps"] = ar_token_num + int(math.log2(num_tokens)) - int(math.log2(ar_token_num))
    kwargs.update(window_start=PUBLISHED["cfg_start"], min_cfg_scale=PUBLISHED["min_cfg_scale"])
    return kwargs


def _their_generate(off: Official, fn_name: str, model: nn.Module, labels: torch.Tensor, n: int, *,
                    sample: bool = True) -> torch.Tensor:
    """Their sampler called as their published script calls it (``generate_har`` with ``num_steps``)."""
    p = PUBLISHED
    return getattr(off.generate, fn_name)(
        model, labels, n, cfg_scale=p["cfg_scale"], cfg_interval=-1, cfg_schedule="step",
        cfg_schedule_kwargs=script_schedule_kwargs(fn_name == "generate_har", n),
        ar_token_num=AR_TOKEN_NUM, temperature=1.0, top_k=0, top_p=p["top_p"], sample_logits=sample)


def _our_sample(model: GPT, labels: torch.Tensor, layout: Any, temperature: float = 1.0) -> tuple[torch.Tensor, list]:
    """The published setting with the release's schedule (``step-release``): codes and per-pass scales."""
    p = PUBLISHED
    r = sample_layout(model, labels, layout, cfg_scale=p["cfg_scale"], cfg_schedule="step-release",
                      cfg_start=p["cfg_start"], temperature=temperature, top_p=p["top_p"])
    return r.codes, r.cfg_scales


def code_agreement(a_BN: torch.Tensor, b_BN: torch.Tensor) -> dict[str, Any]:
    """Position-by-position agreement of two (B, N) code tensors: the share of equal codes and,
    per row, the first position where they differ (None where the rows are identical)."""
    if a_BN.shape != b_BN.shape:
        raise ValueError(f"code tensors differ in shape: {tuple(a_BN.shape)} vs {tuple(b_BN.shape)}")
    same_BN = a_BN.long() == b_BN.long()
    first = [None if bool(r.all()) else int((~r).nonzero()[0]) for r in same_BN]
    return {"rate": float(same_BN.float().mean()), "equal": f"{int(same_BN.sum())}/{same_BN.numel()}",
            "first_difference": first}


def bf16_status() -> dict[str, Any]:
    """Whether this CPU computes bf16 natively (:func:`hieratok.precision.native_on_cpu`), as recorded."""
    native = bool(native_on_cpu("bf16"))
    return {"native": native, "emulated": not native, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "note": None if native else "no AVX512-BF16 / AMX-BF16 on this CPU: bf16 is emulated, so bf16 timings "
                                        "here say nothing about bf16 where it is native"}


def sampling_section(off: Official, args: argparse.Namespace) -> tuple[list[dict], dict]:
    theirs, ours = build_gpts(off, args.seed + 1, vanilla=False)
    labels = torch.arange(args.batch) * 97 % 1000
    N = theirs.block_size
    parity: dict[str, Any] = {}
    with torch.inference_mode():
        for name, sample in (("greedy", False), ("sampled", True)):
            torch.manual_seed(args.seed)
            with ScaleRecorder(off.generate) as rec:
                ct = _their_generate(off, "generate_har", theirs, labels, N, sample=sample)
            torch.manual_seed(args.seed)
            co, scales = _our_sample(ours, labels, har_layout(N, AR_TOKEN_NUM), temperature=1.0 if sample else 0.0)
            parity[f"har_{name}_codes_identical"] = f"{int((ct.long() == co).sum())}/{co.numel()}"
        fp32_codes = {"official": ct.long(), "ours": co}  # the sampled ones
        parity["official_har_cfg_scales"] = rec.scales
        parity["step_release_schedule_equals_official"] = scales == rec.scales
    print(f"HAR parity: {parity}", flush=True)

    bf16 = args.precision == "bf16"
    regime: Callable[[], ContextManager] = (lambda: inference_precision("bf16", "cpu")) if bf16 else nullcontext
    agreement: dict[str, Any] = {}
    if bf16:
        theirs.to(dtype=torch.bfloat16)  # what their sampling script does with --precision bf16
        with torch.inference_mode():
            torch.manual_seed(args.seed)
            ct16 = _their_generate(off, "generate_har", theirs, labels, N).long()
            torch.manual_seed(args.seed)
            with regime():
                co16, _ = _our_sample(ours, labels, har_layout(N, AR_TOKEN_NUM))
        agreement = {"ours_bf16_vs_ours_fp32": code_agreement(co16, fp32_codes["ours"]),
                     "official_bf16_vs_official_fp32": code_agreement(ct16, fp32_codes["official"]),
                     "ours_bf16_vs_official_bf16": code_agreement(co16, ct16)}
        parity["har_bf16_sampled_agreement"] = agreement
        print("HAR bf16 codes agreeing: " + ", ".join(f"{k} {v['equal']} (first difference per row: "
                                                      f"{v['first_difference']})" for k, v in agreement.items()),
              flush=True)

    def ours_with(fast: bool, layout: Any) -> Callable[[], Any]:
        def run() -> Any:
            ours.set_fast_paths(fast)
            with regime():
                return _our_sample(ours, labels, layout)
        return run

    fns = {"har official": lambda: _their_generate(off, "generate_har", theirs, labels, N),
           "har ours": ours_with(True, har_layout(N, AR_TOKEN_NUM))}
    if args.reference_paths:
        fns["har ours (reference paths)"] = ours_with(False, har_layout(N, AR_TOKEN_NUM))
    with torch.inference_mode():  # in bf16 the agreement runs above were each side's warm-up
        res = timed(fns, args.repeats, 0 if bf16 else 1, args.wait_quiet)
    row = _row(f"HAR sampling, batch {args.batch} + CFG (9 passes), {args.precision}", res, "har official",
               "har ours", reference="har ours (reference paths)" if args.reference_paths else None)
    row["precision"] = args.precision
    if agreement:
        row.update(agree_ours=agreement["ours_bf16_vs_ours_fp32"]["rate"],
                   agree_official=agreement["official_bf16_vs_official_fp32"]["rate"],
                   agree_between=agreement["ours_bf16_vs_official_bf16"]["rate"])
    rows = [row]
    if args.ar_repeats > 0 and bf16:
        print("token-by-token AR is timed in fp32 only: skipped with --precision bf16", flush=True)
    elif args.ar_repeats > 0:
        vanilla = off.gpt_vanilla.GPT_models[off.config.model.generator.model_type](off.config).eval()
        share_gpt_weights(theirs, vanilla)
        theirs = None
        with torch.inference_mode():
            torch.manual_seed(args.seed)
            with ScaleRecorder(off.generate) as rec:
                ct = _their_generate(off, "generate", vanilla, labels, N)
            torch.manual_seed(args.seed)
            co, scales = _our_sample(ours, labels, ar_layout(N))
            parity["ar_sampled_codes_identical"] = f"{int((ct.long() == co).sum())}/{co.numel()}"
            parity["ar_step_release_schedule_equals_official"] = scales == rec.scales
            print(f"AR parity: {parity['ar_sampled_codes_identical']}", flush=True)
            fns = {"ar official": lambda: _their_generate(off, "generate", vanilla, labels, N),
                   "ar ours": ours_with(True, ar_layout(N))}
            res = timed(fns, args.ar_repeats, 0, args.wait_quiet)
        rows.append(_row(f"token-by-token AR, batch {args.batch} + CFG ({N} passes)", res, "ar official", "ar ours"))
    ours.set_fast_paths(True)
    return rows, parity


def gradient_parity(ref: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
                    floor: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Relative gradient errors ``max|g - g_ref| / max|g_ref|`` per tensor of ``ours`` and of the
    noise ``floor`` (another float32 path of ours), with the worst tensors and both medians."""
    def rel(g: dict[str, torch.Tensor]) -> dict[str, float]:
        return {n: float((g[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)) for n in g}

    err, noise = rel(ours), rel(floor)
    worst = sorted(err, key=err.get, reverse=True)[:5]
    return {"tensors": len(err), "rel_err_max": err[worst[0]], "rel_err_median": float(torch.tensor(list(err.values())).median()),
            "floor_rel_err_max": max(noise.values()), "floor_rel_err_median": float(torch.tensor(list(noise.values())).median()),
            "worst": {n: err[n] for n in worst}}


def gradient_section(off: Official, args: argparse.Namespace) -> dict[str, Any]:
    """Training-mode gradients of theirs and ours on one batch (see step 7 of the docstring)."""
    theirs, ours = build_tokenizers(off, args.seed, nested_dropout_prob=0.0)
    theirs.train()
    ours.train()
    sd, cfg = theirs.state_dict(), ours.config
    x01 = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(args.seed))
    rec, rd = theirs(x01)  # their training forward: drop_latent_tokens is off in this config
    (F.mse_loss(rec, x01) + rd["quantizer_loss"]).backward()
    named = dict(theirs.named_parameters())
    ref = convert_restok_checkpoint({k: named[k].grad if k in named and named[k].grad is not None
                                     else torch.zeros_like(v) for k, v in sd.items()}, cfg)
    theirs = None
    grads = {}
    for fast in (True, False):
        ours.zero_grad(set_to_none=True)
        ours.set_fast_paths(fast)
        out = ours(x01 * 2 - 1)
        (F.mse_loss((out["reconstructions"] + 1) / 2, x01) + out["vq_loss"]).backward()
        grads[fast] = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
        if fast:
            codes = bool(torch.equal(out["indices"].flatten(), rd["min_encoding_indices"].flatten()))
    res = {"codes_identical": codes, "no_gradient": sorted(set(dict(ours.named_parameters())) - set(grads[True])),
           **gradient_parity(ref, grads[True], grads[False])}
    print(f"gradient parity: {res}", flush=True)
    return {f"gradients_{k}": v for k, v in res.items()}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="path of a local checkout of github.com/Kwai-Kolors/ResTok")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of the tokenizer and HAR runs (median)")
    ap.add_argument("--ar-repeats", type=int, default=1, help="timed rounds of token-by-token AR (0 skips it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference-paths", action="store_true",
                    help="also time ours with its fast paths switched off (set_fast_paths(False))")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each timed round wait up to this long for other processes to leave the CPUs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("tokenizer", "sampling", "gradients"), default=None,
                    help="one section; 'gradients' (training-mode gradient parity) runs only when named")
    ap.add_argument("--precision", choices=tuple(PRECISION_REGIMES), default="fp32",
                    help="of HAR sampling, each side as its released sampler runs it (see the docstring); "
                         "the tokenizer rows stay fp32")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="keep freed memory in this process (hieratok.machine.keep_freed_memory, as the trainer "
                         "does): both sides then reuse their activations' pages instead of faulting fresh ones")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        print(f"freed memory kept in this process, for both sides: {keep_freed_memory()}", flush=True)
    machine = machine_info()  # at the start: its date and load average describe the run, not its end
    off = load_official(args.official)
    print(f"official checkout {off.root} @ {off.commit}; shimmed: {off.shimmed or 'none'}", flush=True)
    precision = {"name": args.precision, **PRECISION_REGIMES[args.precision]}
    if args.precision == "bf16":
        resolve_precision("bf16", "cpu")  # hieratok's own warning where bf16 is emulated
        precision["bf16"] = status = bf16_status()
        print(f"bf16 on this CPU ({status['cpu_capability']}): "
              + ("native" if status["native"] else f"EMULATED ({status['note']})"), flush=True)
        print(f"  official: {precision['official']}\n  ours: {precision['ours']}", flush=True)
    rows, parity = [], {}
    if args.only in (None, "tokenizer"):
        r, p = tokenizer_section(off, args)
        rows += r
        parity.update(p)
    if args.only in (None, "sampling"):
        r, p = sampling_section(off, args)
        rows += r
        parity.update(p)
    if args.only == "gradients":
        parity.update(gradient_section(off, args))
    print()
    columns = [("what", "run (median of rounds)", "s"), ("official", "official s", ".3f"),
               ("ours", "ours s", ".3f"), ("speedup", "speed-up", ".2f"), ("speedup_min", "speed-up (best)", ".2f"),
               ("ours_reference_paths", "ours, reference paths s", ".3f"), ("other_cpu", "others' CPU", ".0%")]
    if args.precision != "fp32":  # share of codes equal to the fp32 codes of the same seed
        p = args.precision
        columns += [("agree_ours", f"ours {p}=fp32", ".1%"), ("agree_official", f"official {p}=fp32", ".1%"),
                    ("agree_between", f"ours=official {p}", ".1%")]
    if rows:
        print_table(rows, columns)
    if args.precision == "bf16" and not precision["bf16"]["native"]:
        print(f"bf16 was EMULATED on this CPU: {precision['bf16']['note']}")
    write_json(args.json, {"machine": machine, "official_commit": off.commit, "shimmed": off.shimmed,
                           "args": vars(args), "published_setting": PUBLISHED, "precision": precision,
                           "rows": rows, "parity": parity})


if __name__ == "__main__":
    main()
