"""A HieraTok as diffusers' AutoencoderKL, driven by diffusers' own components (its Gaussian
posterior class, VaeImageProcessor, DiTPipeline with a DiT transformer and a DDIM scheduler)."""

import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution  # noqa: E402
from diffusers.models.modeling_outputs import AutoencoderKLOutput  # noqa: E402

from hieratok import HieraTok  # noqa: E402
from hieratok.data import EmbeddedPhotos  # noqa: E402
from hieratok.data.images import tensor_to_pil  # noqa: E402
from hieratok.interop.diffusers import as_diffusers_vae, scaling_fields  # noqa: E402
from hieratok.tokenizers import ResTok  # noqa: E402

C = 8  # latent channels of the tiny preset (64 px, patch 8: z is (B, 8, 8, 8))
STATS = dict(latent_mean=[0.1 * k - 0.3 for k in range(C)], latent_std=[0.5 + 0.25 * k for k in range(C)])


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1, **STATS).eval()


@pytest.fixture(scope="module")
def images():
    ds = EmbeddedPhotos("heldout", 64)
    return torch.stack([ds[i][0] for i in range(2)])


@torch.no_grad()
def test_posterior_is_diffusers_distribution_over_our_mean_and_logvar(tok, images):
    vae = as_diffusers_vae(tok)
    out = vae.encode(images)
    dist, post = out.latent_dist, tok.encode(images)
    assert isinstance(out, AutoencoderKLOutput) and isinstance(dist, DiagonalGaussianDistribution)
    assert dist.mode().shape == (2, C, 8, 8)
    for ours, theirs in ((post.mean, dist.mode()), (post.mean, dist.mean), (post.std, dist.std), (post.logvar, dist.logvar)):
        assert torch.equal(ours, theirs)
    # the same reparameterised draw from the same generator state (both draw eps on the CPU generator)
    assert torch.equal(dist.sample(torch.Generator().manual_seed(3)), post.sample(torch.Generator().manual_seed(3)))
    # KL: the same terms (non-negative), summed in another order: within n * eps32 relative, n = 512 terms
    torch.testing.assert_close(dist.kl(), post.kl(), rtol=C * 8 * 8 * 2.0**-24, atol=0)
    (dist_t,) = vae.encode(images, return_dict=False)
    assert torch.equal(dist_t.mode(), post.mean)
    z = dist.mode()
    dec = vae.decode(z)
    assert isinstance(dec, DecoderOutput) and torch.equal(dec.sample, tok.decode(z))
    assert torch.equal(vae.decode(z, return_dict=False)[0], tok.decode(z))
    assert torch.equal(vae(images).sample, tok.decode(post.mean))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(vae(images, sample_posterior=True, generator=g).sample,
                       tok.decode(post.sample(torch.Generator().manual_seed(5))))
    assert vae.dtype == torch.float32 and vae.device == torch.device("cpu")
    assert vae.config.latent_channels == vae.config["latent_channels"] == C and vae.config.sample_size == 64
    assert 2 ** (len(vae.config.block_out_channels) - 1) == tok.config.patch_size  # pipelines' vae_scale_factor


def test_dtype_follows_the_tokenizer():
    torch.manual_seed(0)
    vae = as_diffusers_vae(HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1), scaling_factor=1.0)
    vae.to(torch.float64)
    assert vae.dtype == torch.float64 and vae.tokenizer.last_layer().dtype == torch.float64
    with torch.no_grad():
        assert vae.decode(torch.zeros(1, C, 8, 8, dtype=torch.float64)).sample.dtype == torch.float64


def test_scaling_fields_normalise_latents_in_closed_form(gen):
    # latents with per-channel offsets and spreads; their population statistics per channel
    z = (torch.randn(50, 4, 6, 6, generator=gen, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 3.0]).view(1, 4, 1, 1)
         + torch.tensor([-1.0, 0.0, 0.5, 2.0]).view(1, 4, 1, 1))
    mean, std = z.mean(dim=(0, 2, 3)).tolist(), z.std(dim=(0, 2, 3), unbiased=False).tolist()
    g = scaling_fields(mean, std)  # SD3 / Flux: (z - shift_factor) * scaling_factor
    assert g["latents_mean"] is None and g["latents_std"] is None
    zg = (z - g["shift_factor"]) * g["scaling_factor"]
    assert abs(zg.mean().item()) < 1e-12 and zg.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-12)
    c = scaling_fields(mean, std, "channel")  # SDXL: (z - latents_mean) * scaling_factor / latents_std
    assert c["scaling_factor"] == 1.0 and c["shift_factor"] is None
    zc = (z - torch.tensor(c["latents_mean"], dtype=torch.float64).view(1, 4, 1, 1)) * c["scaling_factor"] / torch.tensor(c["latents_std"], dtype=torch.float64).view(1, 4, 1, 1)
    assert zc.mean(dim=(0, 2, 3)).abs().max().item() < 1e-12
    torch.testing.assert_close(zc.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert scaling_fields(mean, std, scaling_factor=0.25, shift_factor=0.0)["scaling_factor"] == 0.25
    assert scaling_fields(None, None, shift_factor=0.5) == {"scaling_factor": 1.0, "shift_factor": 0.5,
                                                            "latents_mean": None, "latents_std": None}
    with pytest.raises(ValueError, match="cache-latents --update-tokenizer"):
        scaling_fields(None, None, "channel")
    with pytest.raises(ValueError, match="normalization must be one of"):
        scaling_fields(mean, std, "per-channel")


def test_the_adapter_reads_the_tokenizer_statistics(tok):
    m, s = STATS["latent_mean"], STATS["latent_std"]
    g = as_diffusers_vae(tok).config
    M = sum(m) / C
    assert g.shift_factor == pytest.approx(M, rel=1e-15)
    assert g.scaling_factor == pytest.approx(1 / math.sqrt(sum(a * a + b * b for a, b in zip(m, s)) / C - M * M), rel=1e-15)
    c = as_diffusers_vae(tok, normalization="channel").config
    assert c.latents_mean == pytest.approx(m) and c.latents_std == pytest.approx(s) and c.scaling_factor == 1.0


def test_vq_and_foreign_tokenizers_are_refused():
    with pytest.raises(TypeError, match="restok is a VQ tokenizer .* needs a continuous latent"):
        as_diffusers_vae(ResTok.from_preset("restok-tiny"))
    with pytest.raises(TypeError, match="Linear is not a hieratok tokenizer"):
        as_diffusers_vae(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_vae_image_processor_round_trip(tok, images):
    """preprocess -> encode -> scale -> unscale -> decode -> postprocess, as an img2img pipeline does."""
    vae = as_diffusers_vae(tok)
    proc = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    pil = tensor_to_pil(images[0])
    x = proc.preprocess(pil, height=64, width=64)
    u8 = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float()
    # diffusers maps u8 to 2 * (u8 / 255) - 1, we to u8 / 127.5 - 1: two float32 roundings of values <= 1 apart
    torch.testing.assert_close(x, u8 / 127.5 - 1, rtol=0, atol=2 * 2.0**-23)
    z = vae.encode(x).latent_dist.mode()
    assert torch.equal(z, tok.encode(x).mode())
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    z_scaled = (z - shift) * sf
    z_back = z_scaled / sf + shift
    # four float32 roundings, each at most half an ulp of a value below |z| + |shift| (scaled back)
    assert (z_back - z).abs().max().item() <= 4 * 2.0**-24 * (z.abs().max().item() + abs(shift)) * 2
    rec = vae.decode(z_back).sample
    out = proc.postprocess(rec, output_type="np")
    ref = (tok.decode(z_back) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert out.shape == (1, 64, 64, 3) and np.array_equal(out, ref)
    assert proc.postprocess(rec, output_type="pil")[0].size == (64, 64)


@torch.no_grad()
def test_dit_pipeline_samples_through_the_adapter(tok):
    """diffusers' DiTPipeline with our VAE. With the transformer's output layer zeroed (eps = 0),
    deterministic DDIM maps the initial noise x_T to x_T / sqrt(alphabar_T) whatever the number of
    steps (each step divides by sqrt(alphabar_t) and multiplies by sqrt(alphabar_prev), the last
    one by 1; "leading" spacing makes each step's prev the next step's t): the latents the
    pipeline decodes are known in closed form."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=C, num_layers=1,
                               sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    torch.nn.init.zeros_(tr.proj_out_2.weight)
    torch.nn.init.zeros_(tr.proj_out_2.bias)
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)
    vae = as_diffusers_vae(tok)
    seen = []
    decode = vae.decode
    vae.decode = lambda z, **kw: (seen.append(z), decode(z, **kw))[1]
    pipe = DiTPipeline(transformer=tr, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 2], guidance_scale=1.0, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    x_T = torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(0))
    alphabar_T = sched.alphas_cumprod[sched.timesteps[0]]
    expected = x_T / alphabar_T.sqrt() / vae.config.scaling_factor
    # about ten float32 operations, each off by at most half an ulp
    torch.testing.assert_close(seen[0], expected, rtol=10 * 2.0**-24, atol=0)
    ref = (tok.decode(seen[0]) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 64, 64, 3) and np.array_equal(out, ref)
