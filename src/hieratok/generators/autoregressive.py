"""Sequence layouts, training batches and KV-cached sampling for next-token and next-hierarchy AR.

ResTok's hierarchical autoregressive generator (HAR, arXiv 2601.03955 sec. 3.4) and a plain
next-token GPT are one model with two layouts of the same N level-ordered codes.

A layout cuts the N positions of the GPT sequence into *groups*; one forward pass predicts one
group. Position 0 holds the class token, and position p predicts code p. The inputs of a group
are the codes predicted by the group before it, followed by learned placeholders until the group
has as many inputs as codes to predict. A block-causal mask over the groups lets every position
see its own group and all earlier ones.

For N = 128 and 4 next-token codes (ResTok), the groups have sizes 1, 1, 1, 1, 4, 8, 16, 32, 64:

    position  0    1   2   3   4   5 6 7   8..11   12..15   16..23   24..31  ...
    input     cls  c0  c1  c2  c3  s0..s2  c4..c7  s3..s6   c8..c15  s7..s14 ...
    predicts  c0   c1  c2  c3  c4  c5..c7  c8..c11 c12..c15 c16..c23 c24..c31 ...

so sampling takes 9 forward passes (a prefill and 3 next-token steps for c0..c3, then levels of
4, 8, 16, 32 and 64 codes), and 63 placeholders are used (the released model has a table of 127).
The plain next-token layout is the special case with groups of size 1 and no placeholders; on
the first 4 positions the two layouts are identical.

Sampling runs the conditional and the unconditional (null class) halves of classifier-free
guidance in one batch and keeps one :class:`~hieratok.generators.llamagen.KVCache`.

Legend: B batch, N codes, L positions of one group, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import config_from_dict, require_positive_ints
from ..nn.masks import MaskSpec
from .llamagen import GPT, check_ids

__all__ = [
    "SequenceLayout", "grouped_layout", "har_layout", "ar_layout", "har_level_sizes", "training_batch",
    "sequence_loss", "filter_logits", "sample_logits", "cfg_scale_at", "release_step_scales",
    "release_token_step_scales", "CFG_SCHEDULES",
    "SampleResult", "ARObjective",
    "sample_layout", "har_sample", "ar_sample",
]

CFG_SCHEDULES = ("constant", "step", "step-release", "step-release-tokens")


@dataclass(frozen=True)
class SequenceLayout:
    """How N codes become a GPT input sequence and in which groups they are predicted.

    Attributes:
        group_sizes: positions per forward pass; the first group is the class token alone,
            ``sum(group_sizes) == num_tokens``, sizes never shrink.
        code_index: for input positions 1..N-1, the code index fed there, or -1 for a placeholder.
        placeholder_index: for input positions 1..N-1, the placeholder id, or -1 for a code.
    """

    group_sizes: tuple[int, ...]
    code_index: tuple[int, ...] = field(repr=False)
    placeholder_index: tuple[int, ...] = field(repr=False)

    @property
    def num_tokens(self) -> int:
        """N, the codes per sample (= GPT positions, class token included)."""
        return sum(self.group_sizes)

    @property
    def num_steps(self) -> int:
        """Forward passes needed to sample one sequence (ResTok HAR, N = 128: 9)."""
        return len(self.group_sizes)

    @property
    def num_placeholders(self) -> int:
        """Placeholder embeddings the layout uses."""
        return sum(i >= 0 for i in self.placeholder_index)

    def group_bounds(self) -> list[tuple[int, int]]:
        """``(start, end)`` positions of every group."""
        out, s = [], 0
        for n in self.group_sizes:
            out.append((s, s + n))
            s += n
        return out

    @property
    def mask(self) -> MaskSpec:
        """The attention mask: block-causal over the groups."""
        return MaskSpec(self.group_sizes, "causal")

    def input_ids(self, codes_BN: torch.Tensor, vocab_size: int, start: int = 1,
                  end: Optional[int] = None) -> torch.Tensor:
        """Input token ids of positions ``[start, end)`` (>= 1): codes, or ``vocab_size + j`` for placeholder j.

        Only the codes those positions read must be filled in ``codes_BN``.
        """
        end = self.num_tokens if end is None else end
        if not 1 <= start <= end <= self.num_tokens:
            raise ValueError(f"positions [{start}, {end}) are not inside [1, {self.num_tokens})")
        dev = codes_BN.device
        ci = torch.tensor(self.code_index[start - 1:end - 1], dtype=torch.long, device=dev)
        pi = torch.tensor(self.placeholder_index[start - 1:end - 1], dtype=torch.long, device=dev)
        gathered = codes_BN[:, ci.clamp(min=0)]
        return torch.where(ci >= 0, gathered, vocab_size + pi)  # (B, end - start)


def grouped_layout(group_sizes: Sequence[int]) -> SequenceLayout:
    """Layout for arbitrary non-decreasing group sizes (group 0 holds the class token)."""
    sizes = tuple(int(n) for n in group_sizes)
    if not sizes or sizes[0] != 1 or any(b < a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"group sizes must start with 1 (the class token) and never shrink, got {list(group_sizes)}")
    code_index: list[int] = []
    placeholder_index: list[int] = []
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    next_ph = 0
    for g in range(1, len(sizes)):
        prev = list(range(starts[g - 1], starts[g]))  # codes predicted by the previous group
        extra = sizes[g] - len(prev)
        code_index += prev + [-1] * extra
        placeholder_index += [-1] * len(prev) + list(range(next_ph, next_ph + extra))
        next_ph += extra
    return SequenceLayout(sizes, tuple(code_index), tuple(placeholder_index))


def har_level_sizes(num_tokens: int, num_ar_tokens: int) -> list[int]:
    """Level sizes after the next-token prefix: ``a, 2a, 4a, ...`` up to N/2 (N = 128, a = 4: 4..64)."""
    if num_ar_tokens < 1 or num_tokens < num_ar_tokens:
        raise ValueError(f"need 1 <= num_ar_tokens <= num_tokens, got {num_ar_tokens}, {num_tokens}")
    sizes, total = [], num_ar_tokens
    while total < num_tokens:
        sizes.append(total)
        total *= 2
    if total != num_tokens:
        raise ValueError(f"num_tokens {num_tokens} is not num_ar_tokens {num_ar_tokens} times a power of 2")
    return sizes


def har_layout(num_tokens: int = 128, num_ar_tokens: int = 4) -> SequenceLayout:
    """ResTok's next-hierarchy layout: ``num_ar_tokens`` next-token steps, then levels that double."""
    return grouped_layout([1] * num_ar_tokens + har_level_sizes(num_tokens, num_ar_tokens))


def ar_layout(num_tokens: int = 128) -> SequenceLayout:
    """Plain next-token layout (causal mask, no placeholders)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return grouped_layout([1] * num_tokens)


@dataclass(frozen=True)
class ARObjective:
    """The ``objective`` section of an AR generator's training config, checked once for training and sampling.

    Attributes:
        layout: ``"har"`` (next-hierarchy) or ``"ar"`` (plain next-token).
        num_ar_tokens: next-token codes before the doubling levels (HAR only).
        top_k, top_p, temperature, cfg_schedule: sampling defaults (None: those of :func:`sample_layout`).
    """

    layout: str = "har"
    num_ar_tokens: int = 4
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    temperature: Optional[float] = None
    cfg_schedule: Optional[str] = None

    def __post_init__(self) -> None:
        if self.layout not in ("har", "ar"):
            raise ValueError(f"objective.layout {self.layout!r} is not one of ('har', 'ar')")
        require_positive_ints(self, ("num_ar_tokens",))
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"objective.top_k must be an integer >= 0, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"objective.top_p must be in (0, 1], got {self.top_p!r}")
        if self.temperature is not None and not self.temperature >= 0:
            raise ValueError(f"objective.temperature must be >= 0, got {self.temperature!r}")
        if self.cfg_schedule is not None and self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"objective.cfg_schedule {self.cfg_schedule!r} is not one of {CFG_SCHEDULES}")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "ARObjective":
        """From a config's ``objective`` dict; an unknown key (a typo) is an error, never ignored."""
        return config_from_dict(cls, fields)

    def sequence_layout(self, num_tokens: int) -> SequenceLayout:
        """The layout of ``num_tokens`` codes (N of the tokenizer / code cache)."""
        return har_layout(num_tokens, self.num_ar_tokens) if self.layout == "har" else ar_layout(num_tokens)

    def sampling_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keywords for :func:`sample_layout`: the set fields, with ``overrides`` that are not None on top."""
        names = ("top_k", "top_p", "temperature", "cfg_schedule")
        if set(overrides) - set(names):
            raise ValueError(f"sampling overrides {sorted(set(overrides) - set(names))} are not among {names}")
        merged = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})  # validates
        return {k: getattr(merged, k) for k in names if getattr(merged, k) is not None}


def _check(model: GPT, layout: SequenceLayout) -> None:
    if layout.num_placeholders > model.config.num_placeholders:
        raise ValueError(f"layout needs {layout.num_placeholders} placeholders, the model has "
                         f"{model.config.num_placeholders}")


def training_batch(codes_BN: torch.Tensor, layout: SequenceLayout,
                   vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs (B, N-1) (the class token is added by the model) and targets (B, N).

    Codes must be integers in ``[0, vocab_size)`` (larger ids would be read as placeholders).
    """
    if codes_BN.ndim != 2 or codes_BN.shape[1] != layout.num_tokens:
        raise ValueError(f"codes must be (B, {layout.num_tokens}), got {tuple(codes_BN.shape)}")
    if codes_BN.is_floating_point() or codes_BN.is_complex() or codes_BN.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes_BN.dtype}")
    check_ids(codes_BN, vocab_size, "codes (the codebook)")
    if layout.num_tokens == 1:
        return codes_BN[:, :0], codes_BN
    return layout.input_ids(codes_BN, vocab_size), codes_BN


def sequence_loss(model: GPT, codes_BN: torch.Tensor, labels_B: torch.Tensor, layout: SequenceLayout,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mean cross-entropy of all N codes under ``layout`` (class dropout applies in training mode)."""
    _check(model, layout)
    inputs, targets = training_batch(codes_BN, layout, model.config.vocab_size)
    logits_BNV = model(inputs, labels_B, mask=layout.mask, generator=generator)
    return F.cross_entropy(logits_BNV.flatten(0, 1), targets.flatten())


# --- sampling utilities ------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, probe: int = 1024) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus to -inf (last axis).

    top-k keeps the k largest (ties with the k-th are kept); top-p keeps the smallest set of the
    most probable entries whose probabilities sum to at least ``top_p`` (always at least one; an
    entry tied with the least probable kept one is kept too). ``top_k=0`` and ``top_p=1`` switch
    the filters off.

    Fast path (``probe > 0``): the nucleus boundary is looked for among the ``probe`` largest
    entries (peaked distributions) and then among the ``probe`` smallest (flat ones, whose
    dropped tail is short); only rows where it is in neither are fully sorted. ``probe=0`` sorts
    every row (the reference path). Both give the same sets up to float rounding of the running
    sums at the boundary (tests/generators/autoregressive/test_token_sampling.py).
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    out = logits
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        out = out.masked_fill(out < _nucleus_cut(out, top_p, probe), float("-inf"))
    return out


def _nucleus_cut(logits: torch.Tensor, top_p: float, probe: int) -> torch.Tensor:
    """Per row (..., 1), the smallest logit inside the top-p nucleus (see :func:`filter_logits`).

    In descending order entry j is kept iff the mass ranked before it is below ``top_p``. The
    running sums are float64, so the two ways of summing (from the top, from the bottom) agree.
    """
    V = logits.shape[-1]
    k = min(probe, V - 1)
    if k < 1:
        return _nucleus_cut_sorted(logits, top_p)
    lse = logits.double().logsumexp(dim=-1, keepdim=True)
    top = logits.topk(k, dim=-1).values  # descending
    pt = (top.double() - lse).exp()
    n_keep = ((pt.cumsum(dim=-1) - pt) < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
    cut = top.gather(-1, n_keep - 1)
    found = n_keep < k  # the first dropped entry is among the top k
    if bool(found.all()):
        return cut
    bottom = logits.topk(k, dim=-1, largest=False).values  # ascending
    pb = (bottom.double() - lse).exp()
    n_drop = ((1.0 - pb.cumsum(dim=-1)) >= top_p).sum(dim=-1, keepdim=True)  # mass before >= top_p
    low = n_drop < k  # the least probable kept entry is among the bottom k
    cut = torch.where(found, cut, bottom.gather(-1, n_drop.clamp(max=k - 1)))
    rest = ~(found | low)
    if bool(rest.any()):
        cut = torch.where(rest, _nucleus_cut_sorted(logits, top_p), cut)
    return cut


def _nucleus_cut_sorted(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits = logits.sort(dim=-1, descending=True).values
    probs = sorted_logits.double().softmax(dim=-1)
    n_keep = ((probs.cumsum(dim=-1) - probs) < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
    return sorted_logits.gather(-1, n_keep - 1)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one id per row of ``logits`` (..., V) after temperature, top-k and top-p.

    ``temperature=0`` is greedy (argmax). The draw is ``torch.multinomial`` over the rows in order
    (the official sampler's random stream); it runs on ``generator``'s device, so a CPU generator
    also drives a CUDA model (the probabilities are copied to it and the ids copied back).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    src = flat if generator is None else flat.to(generator.device)  # no copy when the devices match
    return torch.multinomial(src, 1, generator=generator).to(flat.device).view(probs.shape[:-1])


def cfg_scale_at(step: int, num_steps: int, cfg_scale: float, schedule: str = "constant",
                 cfg_start: float = 0.25) -> float:
    """Guidance scale of forward pass ``step`` (0 = prefill) of ``num_steps``.

    ``"step"`` uses no guidance (scale 1) while ``step / (num_steps - 1)`` is below ``cfg_start``
    and ``cfg_scale`` from there on; ``"constant"`` always ``cfg_scale``. (``"step-release"`` and
    ``"step-release-tokens"`` are the release's: :func:`release_step_scales`,
    :func:`release_token_step_scales`.)
    """
    if schedule not in ("constant", "step"):
        raise ValueError(f"cfg_schedule {schedule!r} is not one of ('constant', 'step')")
    if schedule == "constant" or num_steps <= 1:
        return cfg_scale
    return cfg_scale if step / (num_steps - 1) >= cfg_start else 1.0


def _release_step(ratio: float, cfg_scale: float, cfg_start: float, min_cfg_scale: float) -> float:
    """The release's "step" schedule at progress ``ratio``: ``cfg_scale`` from ``cfg_start`` on, before
    that ``min_cfg_scale`` (+1e-4 when it is 1, so that the guided formula still runs); no
    guidance at all when ``cfg_scale`` is 1."""
    if cfg_scale == 1.0 or ratio >= cfg_start:
        return cfg_scale
    return min_cfg_scale + 1e-4 if min_cfg_scale == 1.0 else min_cfg_scale


def release_step_scales(layout: SequenceLayout, cfg_scale: float, cfg_start: float = 0.25,
                        min_cfg_scale: float = 1.0) -> list[float]:
    """Per-pass guidance of the authors' published sampling script with its "step" schedule.

    For a HAR generator the script (``sample_c2i_ddp_cfg_search.py``) passes the number of
    forward passes as ``num_steps`` (``a + log2(N) - log2(a)`` with a next-token codes: 9 for
    ResTok, ``har_layout(N, a).num_steps``), and the sampler (``decode_n_tokens`` /
    ``decode_n_tokens_har``) then measures progress in passes: pass g (0 = the prefill) has ratio
    ``g / (num_steps - 1)``.
    For the plain next-token layout the script sets no ``num_steps``, and the token counter it
    falls back to gives the same ``g / (N - 1)``. So for both layouts the ratio of pass g is
    ``g / (layout.num_steps - 1)``. Passes with ratio >= ``cfg_start`` use ``cfg_scale``, the
    others ``min_cfg_scale`` (+1e-4 when that is 1). For ResTok's 128-token layout, ``cfg_start=
    0.25`` and ``cfg_scale=3.75`` (the published setting) this is ``[1.0001, 1.0001] + [3.75] * 7``:
    the passes of ``"step"``, with 1.0001 instead of 1 on the unguided ones.
    """
    last = max(1, layout.num_steps - 1)
    return [_release_step(g / last, cfg_scale, cfg_start, min_cfg_scale) for g in range(layout.num_steps)]


def release_token_step_scales(layout: SequenceLayout, cfg_scale: float, cfg_start: float = 0.25,
                              min_cfg_scale: float = 1.0) -> list[float]:
    """The release's HAR sampler when ``num_steps`` is not set: not used by its published sampling script.

    Without ``num_steps`` the release measures progress by a token counter: the prefill has ratio
    0; the first next-token pass ``1 / (N - 1)``, the next-token passes g = 2..a ``g / a`` (a:
    next-token passes after the prefill, 3 for ResTok); a level starting at position s has
    ``s / (N - 1)``. Kept as ``cfg_schedule="step-release-tokens"`` to compare with.
    Guidance as in :func:`release_step_scales`. For ResTok's 128-token layout and
    ``cfg_start=0.25`` this is ``[u, u, g, g, u, u, u, g, g]`` (u = 1.0001, g = ``cfg_scale``): not
    monotone. For the plain next-token layout it equals :func:`release_step_scales`.
    """
    N = layout.num_tokens
    bounds = layout.group_bounds()
    ar_steps = 0  # single-token passes right after the prefill
    while ar_steps + 1 < len(bounds) and bounds[ar_steps + 1][1] - bounds[ar_steps + 1][0] == 1:
        ar_steps += 1
    out = []
    for g, (s, e) in enumerate(bounds):
        if g == 0:
            ratio = 0.0
        elif e - s == 1 and g <= ar_steps:
            ratio = 1 / (N - 1) if g == 1 else g / ar_steps
        else:
            ratio = s / (N - 1)
        out.append(_release_step(ratio, cfg_scale, cfg_start, min_cfg_scale))
    return out


@dataclass
class SampleResult:
    """Output of :func:`sample_layout`.

    Attributes:
        codes: sampled codes (B, N).
        step_logits: raw model logits of every forward pass, (B or 2B, L_g, V) each, the
            conditional half first when guidance runs (only if requested).
        cfg_scales: guidance scale used at each pass.
    """

    codes: torch.Tensor
    step_logits: list[torch.Tensor]
    cfg_scales: list[float]


@torch.no_grad()
def sample_layout(
    model: GPT,
    labels_B: torch.Tensor,
    layout: SequenceLayout,
    *,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    cfg_start: float = 0.25,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    keep_logits: bool = False,
    cfg_scales: Optional[Sequence[float]] = None,
) -> SampleResult:
    """Sample codes group by group with a KV cache: one forward pass per group of ``layout``.

    Guided logits are ``uncond + s * (cond - uncond)``; when ``cfg_scale != 1`` the null-class
    half runs in the same batch for every pass (also where the schedule uses s = 1), so its
    cache stays complete. ``cfg_scales`` (one per pass) replaces the schedule, e.g. to replay
    the scales another implementation used.
    """
    if model.training:
        raise ValueError("sampling needs model.eval() (dropout and class dropout are on in training mode)")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule {cfg_schedule!r} is not one of {CFG_SCHEDULES}")
    _check(model, layout)
    if cfg_schedule == "step-release" and cfg_scales is None:
        cfg_scales = release_step_scales(layout, cfg_scale, cfg_start)
    elif cfg_schedule == "step-release-tokens" and cfg_scales is None:
        cfg_scales = release_token_step_scales(layout, cfg_scale, cfg_start)
    if cfg_scales is not None:
        cfg_scales = [float(s) for s in cfg_scales]
        if len(cfg_scales) != layout.num_steps or min(cfg_scales) < 0:
            raise ValueError(f"cfg_scales needs {layout.num_steps} scales >= 0 (one per pass), got {cfg_scales}")
    B, N, V = labels_B.shape[0], layout.num_tokens, model.config.vocab_size
    device = model.tok_embed.weight.device
    labels_B = labels_B.to(device)
    guided = cfg_scale != 1.0 if cfg_scales is None else any(s != 1.0 for s in cfg_scales)
    labels_in = torch.cat([labels_B, torch.full_like(labels_B, model.null_class)]) if guided else labels_B
    cache = model.new_cache(labels_in.shape[0], N)
    codes_BN = torch.zeros(B, N, dtype=torch.long, device=device)
    step_logits, scales = [], []
    for g, (s, e) in enumerate(layout.group_bounds()):
        if g == 0:  # prefill: the class token alone
            logits = model(None, labels_in, mask=layout.mask, cache=cache)
        else:
            tokens = layout.input_ids(codes_BN, V, s, e)
            logits = model(tokens.repeat(2, 1) if guided else tokens, mask=layout.mask, cache=cache)
        if cfg_scales is not None:
            scale = cfg_scales[g]
        else:
            scale = cfg_scale_at(g, layout.num_steps, cfg_scale, cfg_schedule, cfg_start)
        if guided:
            cond, uncond = logits.chunk(2)
            use = uncond + scale * (cond - uncond)
        else:
            use = logits
        codes_BN[:, s:e] = sample_logits(use, temperature, top_k, top_p, generator)
        scales.append(scale)
        if keep_logits:
            step_logits.append(logits)
    return SampleResult(codes_BN, step_logits, scales)


def har_sample(model: GPT, labels: torch.Tensor, cfg_scale: float = 1.0, *, num_tokens: int = 128,
               num_ar_tokens: int = 4, **sampling: Any) -> torch.Tensor:
    """Next-hierarchy sampling (ResTok HAR); returns codes (B, N) in level order.

    N = 128 with 4 next-token codes takes 9 forward passes (``har_layout(128, 4).num_steps``).
    ``sampling``: the keywords of :func:`sample_layout` (``cfg_schedule``, ``top_k``, ``top_p``,
    ``temperature``, ``generator``, ...). The published setting is ``cfg_scale=3.75,
    cfg_schedule="step-release", top_p=0.95`` (per pass ``[1.0001, 1.0001] + [3.75] * 7``, as the
    authors' sampling script runs it: :func:`release_step_scales`).
    """
    return sample_layout(model, labels, har_layout(num_tokens, num_ar_tokens), cfg_scale=cfg_scale, **sampling).codes


def ar_sample(model: GPT, labels: torch.Tensor, cfg_scale: float = 1.0, *, num_tokens: int = 128,
              **sampling: Any) -> torch.Tensor:
    """Plain next-token sampling, one forward pass per code; returns codes (B, N) (``sampling``: as
    for :func:`har_sample`)."""
    return sample_layout(model, labels, ar_layout(num_tokens), cfg_scale=cfg_scale, **sampling).codes
