"""Kandinsky 3 at full scale, run by kandlab's own modules (lesson 09).

The published model is three networks and two small settings files, stored in the hub's *diffusers folder
format*::

    model_index.json              which class each sub-folder holds
    text_encoder/  config.json + model(.fp16)(-0000k-of-0000n).safetensors [+ .index(.fp16).json]   Flan-UL2 encoder
    unet/          config.json + diffusion_pytorch_model(.fp16).safetensors  [sharded the same way]   Kandinsky3UNet
    movq/          config.json + diffusion_pytorch_model(.fp16).safetensors                           VQModel (MoVQ)
    scheduler/     scheduler_config.json                                                             DDPMScheduler
    tokenizer/     the T5 tokenizer files

`Kandinsky3Pipeline.from_pretrained` reads that folder into kandlab's `T5Encoder` (lesson 04), `UNet` (lesson 03)
and `MoVQ` (lesson 07): each network is built on the ``meta`` device (shapes, no memory) and then *adopts* the
memory-mapped tensors of its safetensors files (``load_state_dict(..., assign=True)``), so the weights are never
held twice. Its ``__call__`` and `Kandinsky3Pipeline.img2img` follow diffusers' ``Kandinsky3Pipeline`` and
``Kandinsky3Img2ImgPipeline`` line by line (argument names, defaults, random draws), which the test suite checks on a
tiny random pipeline saved by diffusers itself (`save_tiny_diffusers_pipeline`). `plan` says how the 11.9 B
parameters fit a given GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kandlab.diffusion import GaussianDiffusion, dynamic_threshold, kandinsky3_cfg_eps, make_timesteps, static_threshold
from kandlab.movq import MoVQ, MoVQConfig
from kandlab.movq import config_from_diffusers as movq_config_from_diffusers
from kandlab.schedules import cosine_betas, linear_betas
from kandlab.t5 import T5Config, T5Encoder
from kandlab.unet import UNet, UNetConfig
from kandlab.unet import config_from_diffusers as unet_config_from_diffusers
from kandlab.weights import OfflineError, hub_reachable

REPO_ID = "kandinsky-community/kandinsky-3"  # the published weights on the hub
MAX_LENGTH = 128  # Kandinsky 3 pads every prompt to 128 T5 tokens
COMPONENTS = ("tokenizer", "text_encoder", "unet", "movq", "scheduler")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------
# 1. Reading the folder: safetensors files, shards and variants


def weight_files(folder: Path, base: str, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) holding one component's weights.

    ``base`` is ``diffusion_pytorch_model`` (diffusers) or ``model`` (transformers). A single file is
    ``<base>[.<variant>].safetensors``; a sharded one has an index, ``<base>.safetensors.index[.<variant>].json``,
    whose ``weight_map`` names the shards. With a ``variant`` (e.g. ``"fp16"``) only that variant is accepted,
    as in diffusers.
    """
    folder = Path(folder)
    tag = f".{variant}" if variant else ""
    single = folder / f"{base}{tag}.safetensors"
    index = folder / f"{base}.safetensors.index{tag}.json"
    if single.exists():
        return [single]
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names {len(missing)} shard(s) that are not there: "
                                    f"{', '.join(missing[:3])}; download the whole folder again")
        return [folder / s for s in shards]
    present = sorted(p.name for p in folder.glob("*.safetensors*")) if folder.is_dir() else []
    hint = (f" It has: {', '.join(present)}." if present else " It has no safetensors files.")
    if variant and present:
        hint += " Load without variant= (or with the variant those files carry)."
    raise FileNotFoundError(f"no {single.name} (or {index.name} with its shards) in {folder}.{hint}")


def load_safetensors(files: Sequence[Path], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """All tensors of ``files``, memory-mapped: the pages are read from disk when first used and belong to
    the file cache, so adopting them (``assign=True``) costs no second copy. ``dtype`` converts tensor by
    tensor (a conversion does allocate the converted copy)."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in files:
        part = load_file(str(path))  # mmap-backed CPU tensors
        if dtype is not None:
            part = {k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()}
        state.update(part)
    return state


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; a diffusers Kandinsky 3 folder has model_index.json and "
                                f"{', '.join(COMPONENTS)} sub-folders (download all of {REPO_ID})")
    return json.loads(path.read_text())


def check_model_index(folder: Path) -> dict:
    """Read ``model_index.json`` and refuse a folder that is not a Kandinsky 3 pipeline (e.g. Kandinsky 2.2,
    whose decoder is a different UNet)."""
    index = _read_json(Path(folder) / "model_index.json")
    name = index.get("_class_name")
    if name not in ("Kandinsky3Pipeline", "Kandinsky3Img2ImgPipeline"):
        raise ValueError(f"{folder} holds a {name}, not a Kandinsky3Pipeline; kandlab.kandinsky3 reads only "
                         f"Kandinsky 3 folders (e.g. {REPO_ID})")
    absent = [c for c in COMPONENTS if c not in index]
    if absent:
        raise ValueError(f"{folder}/model_index.json lists no {', '.join(absent)}; the pipeline needs "
                         f"{', '.join(COMPONENTS)}")
    return index


# ---------------------------------------------------------------------------
# 2. The scheduler settings (diffusers' DDPMScheduler config) as kandlab's diffusion


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    """The fields of ``scheduler/scheduler_config.json`` that decide the sampler (published values as defaults)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 1

    @classmethod
    def from_config(cls, config: dict) -> SchedulerSettings:
        """Read a ``DDPMScheduler`` config; refuse the settings this sampler does not implement."""
        if config.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
            raise ValueError(f"the scheduler is a {config['_class_name']}; Kandinsky 3 ships a DDPMScheduler")
        names = {f.name for f in dataclasses.fields(cls)}
        settings = cls(**{k: v for k, v in config.items() if k in names})
        unsupported = {
            "beta_schedule": (settings.beta_schedule, ("squaredcos_cap_v2", "linear")),
            "prediction_type": (settings.prediction_type, ("epsilon",)),
            "variance_type": (settings.variance_type, ("fixed_small",)),
            "timestep_spacing": (settings.timestep_spacing, ("leading", "trailing", "linspace")),
        }
        for key, (value, allowed) in unsupported.items():
            if value not in allowed:
                raise ValueError(f"scheduler {key}={value!r} is not implemented here (allowed: {', '.join(allowed)})")
        if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
            raise ValueError("trained_betas / rescale_betas_zero_snr are not implemented; Kandinsky 3 uses neither")
        return settings

    def betas(self) -> Tensor:
        T = self.num_train_timesteps
        if self.beta_schedule == "squaredcos_cap_v2":
            return cosine_betas(T)
        return linear_betas(T, self.beta_start, self.beta_end)

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """diffusers ``set_timesteps``: 25 steps, "leading", offset 1 -> 961, 921, …, 1."""
        return make_timesteps(self.num_train_timesteps, num_inference_steps, self.timestep_spacing,
                              self.steps_offset)

    def previous(self, t: int, num_inference_steps: int) -> int:
        """diffusers' ``previous_timestep``: t − T // N whatever the spacing (-1 and below: the clean image)."""
        return max(t - self.num_train_timesteps // num_inference_steps, -1)

    def x0_fn(self) -> Callable[[Tensor], Tensor] | None:
        """What happens to x̂₀ before the posterior: dynamic thresholding, else clipping, else nothing."""
        if self.thresholding:
            return lambda x0: dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return lambda x0: static_threshold(x0, self.clip_sample_range)
        return None


# ---------------------------------------------------------------------------
# 3. Inputs: prompts, sizes, step counts, images


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> Tensor:
    """diffusers' ``randn_tensor``: drawn on the generator's device *in the target dtype*, then moved."""
    on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=on, dtype=dtype).to(device)


def _prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def latent_size(height: int, width: int, factor: int = 8) -> tuple[int, int]:
    """diffusers' ``downscale_height_and_width(h, w, 8)``: 8·⌈H/64⌉ × 8·⌈W/64⌉ latents, whatever the MoVQ
    (1024 → 128). The image the MoVQ decodes is then latent × the MoVQ's own factor."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int number of pixels, e.g. 1024")
    return tuple(factor * math.ceil(v / factor**2) for v in (height, width))


def _check_steps(num_inference_steps: int, T: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
            or not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an int from 1 to {T} "
                         "(Kandinsky 3 uses 25)")


def _check_guidance(guidance_scale: float) -> None:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a number ≥ 0 (Kandinsky 3 uses 3.0; "
                         "≤ 1 switches guidance off, as in diffusers)")


def image_to_tensor(image, factor: int) -> Tensor:
    """An img2img input as (B, 3, H, W) in [-1, 1], as diffusers' ``VaeImageProcessor`` prepares it: a PIL
    image or a tensor in [0, 1] ((3, H, W) or (B, 3, H, W)); sizes are floored to a multiple of the MoVQ's
    ``factor`` (nearest-neighbour resize). A tensor that is already negative is taken as [-1, 1]."""
    import numpy as np
    from PIL import Image

    images = image if isinstance(image, list) else [image]
    tensors = []
    for item in images:
        if isinstance(item, Image.Image):
            arr = np.asarray(item.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
            item = torch.from_numpy(arr).permute(2, 0, 1)
        if not isinstance(item, Tensor):
            raise TypeError(f"image must be a PIL image, a tensor or a list of them, got {type(item).__name__}")
        item = item[None] if item.ndim == 3 else item
        if item.ndim != 4 or item.shape[1] != 3:
            raise ValueError(f"image tensor must be (3, H, W) or (B, 3, H, W) RGB, got {tuple(item.shape)}")
        tensors.append(item.float())
    x = torch.cat(tensors)  # (B, 3, H, W)
    H, W = (s - s % factor for s in x.shape[-2:])
    if H == 0 or W == 0:
        raise ValueError(f"image of {x.shape[-2]}×{x.shape[-1]} pixels is smaller than the MoVQ's factor {factor}")
    if (H, W) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(H, W))  # diffusers' resize: nearest
    return x if x.min() < 0 else 2 * x - 1


def _postprocess(image: Tensor, output_type: str, scale_pt: bool):
    """diffusers' outputs: "pt" (Kandinsky3Pipeline: the raw decode in ≈ [-1, 1]; img2img: [0, 1]), "np" (B, H,
    W, 3) in [0, 1], "pil" a list of images, "latent" handled by the caller."""
    if output_type == "pt" and not scale_pt:
        return image
    image = (image * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype("uint8")) for a in array]


# ---------------------------------------------------------------------------
# 4. The pipeline


Sampler = Literal["ddpm", "original"]
Callback = Callable[[int, int, Tensor], None]


class Kandinsky3Pipeline:
    """Text → T5 tokens → UNet denoising in MoVQ latent space → MoVQ decode, as diffusers runs Kandinsky 3.

    ``tokenizer`` is a transformers T5 tokenizer; ``text_encoder``, ``unet``, ``movq`` are kandlab's
    `T5Encoder`, `UNet`, `MoVQ`; ``scheduler`` the `SchedulerSettings`. Build it with `from_pretrained`.
    """

    def __init__(self, tokenizer, text_encoder: T5Encoder, unet: UNet, movq: MoVQ,
                 scheduler: SchedulerSettings | None = None, device: str | torch.device | None = None):
        if text_encoder.config.d_model != unet.config.encoder_hid_dim:
            raise ValueError(f"the text encoder's width d_model={text_encoder.config.d_model} must equal the "
                             f"UNet's encoder_hid_dim={unet.config.encoder_hid_dim}; these components do not belong "
                             "together")
        if unet.config.in_channels != movq.config.latent_channels:
            raise ValueError(f"the UNet takes {unet.config.in_channels} channels but the MoVQ's latents have "
                             f"{movq.config.latent_channels}; these components do not belong together")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.movq = movq.eval().requires_grad_(False)
        self.scheduler = scheduler or SchedulerSettings()
        self.diffusion = GaussianDiffusion(self.scheduler.betas())
        self.offload_device: torch.device | None = None  # set by enable_model_offload
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.to(self.device)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike = REPO_ID, torch_dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, variant: str | None = None) -> Kandinsky3Pipeline:
        """Read a diffusers-format Kandinsky 3 folder (or download one by repo id) into kandlab's modules.

        ``torch_dtype`` None keeps the files' dtype (no copy at all; diffusers would convert to float32);
        ``variant="fp16"`` reads the ``*.fp16.safetensors`` files the hub also carries (half the download).
        ``device`` moves the loaded networks there (default: the CPU).
        """
        folder = Path(path_or_repo_id).expanduser()
        if not folder.is_dir():
            folder = download(str(path_or_repo_id), variant)
        check_model_index(folder)
        dtype = _DTYPES[torch_dtype] if isinstance(torch_dtype, str) else torch_dtype
        scheduler = SchedulerSettings.from_config(_read_json(folder / "scheduler" / "scheduler_config.json"))
        text_encoder = load_text_encoder(folder / "text_encoder", dtype, variant)
        unet = load_unet(folder / "unet", dtype, variant)
        movq = load_movq(folder / "movq", dtype, variant)
        return cls(load_tokenizer(folder / "tokenizer"), text_encoder, unet, movq, scheduler, device or "cpu")

    def to(self, device: str | torch.device) -> Kandinsky3Pipeline:
        self.device = torch.device(device)
        for module in (self.text_encoder, self.unet, self.movq, self.diffusion):
            module.to(self.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def movq_factor(self) -> int:
        return self.movq.config.downsample_factor

    # -- memory ----------------------------------------------------------------------------
    def enable_model_offload(self, device: str | torch.device = "cuda") -> Kandinsky3Pipeline:
        """Keep every network in CPU memory and move each to the GPU only while it runs (text encoder, then
        UNet, then MoVQ): GPU memory holds one network at a time. On a machine without a GPU there is nothing to
        offload to, and this says so."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                "enable_model_offload() moves one network at a time onto a CUDA GPU, and this machine has none "
                f"(torch.cuda.is_available() is {torch.cuda.is_available()}). On a CPU everything already lives in "
                "main memory: run the pipeline as it is (see kandinsky3.plan(...) for what a GPU would need).")
        self.to("cpu")
        self.offload_device = device
        self.device = device
        self.diffusion.to(device)
        return self

    @contextmanager
    def _running(self, module: torch.nn.Module):
        """With offload on: the module on the GPU while the block runs, back in CPU memory after it."""
        if self.offload_device is None:
            yield module
            return
        module.to(self.offload_device)
        try:
            yield module
        finally:
            module.to("cpu")
            torch.cuda.empty_cache()

    # -- text ------------------------------------------------------------------------------
    def _tokens(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                             return_tensors="pt")
        return out["input_ids"].to(self.device), out["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      guidance: bool = True) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """T5 states of the prompts, cut as diffusers cuts them (`cut_context`): (B, L, D) embeddings and (B, L)
        masks for the prompt and — with guidance — for the negative prompt (zeros and an all-zero mask when there
        is none), both L = the longest prompt's tokens + 1."""
        prompts = _prompt_list(prompt)
        with self._running(self.text_encoder) as encoder:
            ids, mask = self._tokens(prompts)  # (B, 128) each
            embeds, mask = cut_context(encoder(ids, mask), mask)  # (B, L, D), (B, L)
            dtype = next(encoder.parameters()).dtype
            if not guidance:
                return embeds.to(dtype), mask, None, None
            if negative_prompt is None:
                return embeds.to(dtype), mask, torch.zeros_like(embeds, dtype=dtype), torch.zeros_like(mask)
            negatives = _prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one "
                                 "per prompt")
            neg_ids, neg_mask = self._tokens(negatives)
            neg = encoder(neg_ids, neg_mask)[:, : embeds.shape[1]]  # cut to the prompt's length
            neg_mask = neg_mask[:, : embeds.shape[1]]
            neg = neg * neg_mask[..., None]
        return embeds.to(dtype), mask, neg.to(dtype), neg_mask

    # -- sampling --------------------------------------------------------------------------
    def _eps(self, unet: UNet, x: Tensor, t: int, context: Tensor, mask: Tensor, w: float) -> Tensor:
        """The UNet's noise prediction, guided as Kandinsky 3 guides: (w + 1)·ε_c − w·ε_u (negative first)."""
        guided = context.shape[0] == 2 * x.shape[0]
        x_in = torch.cat([x, x]) if guided else x
        eps = unet(x_in, torch.full((x_in.shape[0],), t, device=x.device), context, mask)
        if not guided:
            return eps
        eps_u, eps_c = eps.chunk(2)
        return kandinsky3_cfg_eps(eps_u, eps_c, w)

    def _denoise(self, latents: Tensor, timesteps: list[int], context: Tensor, mask: Tensor, guidance_scale: float,
                 num_inference_steps: int, generator: torch.Generator | None, sampler: Sampler,
                 callback: Callback | None, progress: bool) -> Tensor:
        """The loop: one guided UNet call and one sampler step per timestep, ``callback(i, t, latents)`` after
        each. ``sampler="ddpm"`` is diffusers' (DDPMScheduler.step, x̂₀ clipped by the folder's settings);
        ``"original"`` is ai-forever's: DDIM with η = 1 and dynamic thresholding of x̂₀ at p = 0.99."""
        from tqdm.auto import tqdm

        dtype = latents.dtype
        x0_fn = self.scheduler.x0_fn()
        with self._running(self.unet) as unet:
            for i, t in enumerate(tqdm(timesteps, desc="Kandinsky 3", disable=not progress, leave=False)):
                eps = self._eps(unet, latents, t, context, mask, guidance_scale)
                if sampler == "ddpm":
                    t_prev = self.scheduler.previous(t, num_inference_steps)
                    noise = _randn(latents.shape, generator, latents.device, eps.dtype) if t > 0 else None
                    step = self.diffusion.ddpm_step(eps, t, latents, t_prev=t_prev, noise=noise, x0_fn=x0_fn)
                else:
                    t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                    noise = _randn(latents.shape, generator, latents.device, eps.dtype)
                    step = self.diffusion.ddim_step(eps, t, latents, t_prev, eta=1.0, noise=noise,
                                                    x0_fn=lambda x0: dynamic_threshold(x0, 0.99))
                latents = step.x_prev.to(dtype)  # the step's float32 constants would promote bf16 latents
                if callback is not None:
                    callback(i, t, latents)
        return latents

    def _context(self, prompt, negative_prompt, guidance_scale) -> tuple[Tensor, Tensor, int]:
        guided = guidance_scale > 1  # diffusers: guidance only above 1
        embeds, mask, neg, neg_mask = self.encode_prompt(prompt, negative_prompt, guided)
        if guided:
            embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
        return embeds, mask.bool(), len(_prompt_list(prompt))

    def _decode(self, latents: Tensor) -> Tensor:
        with self._running(self.movq) as movq, torch.no_grad():
            return movq.decode(latents, quantize=False)  # force_not_quantize=True, as every Kandinsky pipeline

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 3.0, height: int = 1024, width: int = 1024,
                 generator: torch.Generator | None = None, latents: Tensor | None = None, output_type: str = "pt",
                 callback: Callback | None = None, sampler: Sampler = "ddpm", progress: bool = True):
        """Generate images, as diffusers' ``Kandinsky3Pipeline.__call__``.

        Latents (B, 4, 8·⌈H/64⌉, 8·⌈W/64⌉) start as N(0, I) from ``generator`` (or ``latents``); each of the
        ``num_inference_steps`` timesteps (961, 921, …, 1 for 25) runs the UNet on [negative, prompt] contexts and
        guides with (w + 1)·ε_c − w·ε_u; the MoVQ decodes without its codebook. ``output_type``: "pt" (the raw
        decode, ≈ [-1, 1], as diffusers), "np", "pil" ([0, 1]) or "latent".
        """
        _check_steps(num_inference_steps, self.scheduler.num_train_timesteps)
        _check_guidance(guidance_scale)
        _check_output_type(output_type)
        _check_sampler(sampler)
        context, mask, batch = self._context(prompt, negative_prompt, guidance_scale)
        shape = (batch, self.unet.config.in_channels, *latent_size(height, width))
        if latents is None:
            latents = _randn(shape, generator, self.device, context.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; {batch} prompt(s) at {height}×{width} need "
                             f"{shape} (8·⌈H/64⌉ × 8·⌈W/64⌉)")
        latents = latents.to(self.device, context.dtype)
        timesteps = self.scheduler.timesteps(num_inference_steps)
        latents = self._denoise(latents, timesteps, context, mask, guidance_scale, num_inference_steps, generator,
                                sampler, callback, progress)
        if output_type == "latent":
            return latents
        return _postprocess(self._decode(latents), output_type, scale_pt=False)

    @torch.no_grad()
    def img2img(self, prompt: str | Sequence[str], image, strength: float = 0.3,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 25,
                guidance_scale: float = 3.0, generator: torch.Generator | None = None, output_type: str = "pt",
                callback: Callback | None = None, sampler: Sampler = "ddpm", progress: bool = True):
        """Redraw ``image`` towards ``prompt``, as diffusers' ``Kandinsky3Img2ImgPipeline``.

        Of the ``num_inference_steps`` timesteps only the last ``min(int(N·strength), N)`` run (`start_timesteps`:
        25 × 0.3 → 7 steps, from t = 241): the MoVQ encodes the image (not quantized), noise takes it to the first of
        them (q_sample), and the loop denoises from there. ``output_type="pt"`` is in [0, 1] here, as in diffusers.
        """
        _check_steps(num_inference_steps, self.scheduler.num_train_timesteps)
        _check_guidance(guidance_scale)
        _check_output_type(output_type)
        _check_sampler(sampler)
        timesteps = start_timesteps(self.scheduler.timesteps(num_inference_steps), strength)
        context, mask, batch = self._context(prompt, negative_prompt, guidance_scale)
        x = image_to_tensor(image, self.movq_factor).to(self.device, context.dtype)  # (B, 3, H, W) in [-1, 1]
        if x.shape[0] != batch:
            raise ValueError(f"{x.shape[0]} image(s) for {batch} prompt(s); give one image per prompt")
        with self._running(self.movq) as movq:
            z0 = movq.encode(x)  # (B, 4, H/f, W/f), not quantized
        noise = _randn(z0.shape, generator, self.device, context.dtype)
        latents = self.diffusion.q_sample(z0, timesteps[0], noise).to(context.dtype)
        latents = self._denoise(latents, timesteps, context, mask, guidance_scale, num_inference_steps, generator,
                                sampler, callback, progress)
        if output_type == "latent":
            return latents
        return _postprocess(self._decode(latents), output_type, scale_pt=True)


def cut_context(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """diffusers' ``process_embeds(cut_context=True)``: zero the padded positions and keep only the longest
    prompt's tokens + 1 (the +1 is a padding position, so it stays zero): (B, 128, D), (B, 128) →
    (B, L, D), (B, L) with L = max(mask.sum(-1)) + 1."""
    embeds = embeds * mask[..., None].to(embeds.dtype)
    length = int(mask.sum(-1).max()) + 1
    return embeds[:, :length], mask[:, :length]


def start_timesteps(timesteps: list[int], strength: float) -> list[int]:
    """img2img's schedule: the last ``min(int(N·strength), N)`` of the N timesteps (diffusers' get_timesteps)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r} must lie in (0, 1]: 0.3 keeps most of the image, 1 redraws it")
    n = len(timesteps)
    keep = min(int(n * strength), n)
    if keep == 0:
        raise ValueError(f"strength={strength} of {n} steps leaves int({n}·{strength}) = 0 steps to run; raise "
                         f"strength to at least {1 / n:.3g} or use more steps")
    return timesteps[n - keep:]


def _check_output_type(output_type: str) -> None:
    if output_type not in ("pt", "np", "pil", "latent"):
        raise ValueError(f"output_type={output_type!r}: use 'pt', 'np', 'pil' or 'latent'")


def _check_sampler(sampler: str) -> None:
    if sampler not in ("ddpm", "original"):
        raise ValueError(f"sampler={sampler!r}: use 'ddpm' (diffusers') or 'original' (ai-forever's DDIM η = 1 "
                         "with dynamic thresholding)")


# ---------------------------------------------------------------------------
# 5. Each component from its sub-folder


def load_tokenizer(folder: Path):
    """The T5 tokenizer of the folder (transformers reads tokenizer.json or spiece.model)."""
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} is missing; the pipeline needs its tokenizer/ folder")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_text_encoder(folder: Path, dtype: torch.dtype | None = None, variant: str | None = None) -> T5Encoder:
    from transformers import T5Config as HFT5Config

    config = T5Config.from_transformers_config(HFT5Config(**_read_json(Path(folder) / "config.json")))
    return T5Encoder.from_transformers(load_safetensors(weight_files(folder, "model", variant), dtype), config)


def load_unet(folder: Path, dtype: torch.dtype | None = None, variant: str | None = None) -> UNet:
    config = unet_config_from_diffusers(_read_json(Path(folder) / "config.json"))
    state = load_safetensors(weight_files(folder, "diffusion_pytorch_model", variant), dtype)
    return UNet.from_diffusers(state, config)


def load_movq(folder: Path, dtype: torch.dtype | None = None, variant: str | None = None) -> MoVQ:
    config = movq_config_from_diffusers(_read_json(Path(folder) / "config.json"))
    state = load_safetensors(weight_files(folder, "diffusion_pytorch_model", variant), dtype)
    return MoVQ.from_diffusers(state, config)


def download(repo_id: str, variant: str | None = None) -> Path:
    """A hub repo's Kandinsky 3 files, from the local cache or (online) downloaded: only what the pipeline reads
    (configs, tokenizer, the weights of one variant). Offline and not cached: `OfflineError` says what to do."""
    from huggingface_hub import snapshot_download

    tag = f".{variant}" if variant else ""
    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*",
                f"*/model{tag}.safetensors", f"*/model{tag}-*.safetensors", f"*/model.safetensors.index{tag}.json",
                f"*/diffusion_pytorch_model{tag}.safetensors", f"*/diffusion_pytorch_model{tag}-*.safetensors",
                f"*/diffusion_pytorch_model.safetensors.index{tag}.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not (completely) in the cache
        pass
    if not hub_reachable():
        raise OfflineError(
            f"{repo_id!r} is neither a folder here nor in the Hugging Face cache, and the hub (huggingface.co) is "
            f"not reachable. On a machine with internet run `hf download {repo_id}"
            + (f" --include '*{tag}*' '*.json' 'tokenizer/*'" if variant else "")
            + "` (≈ 24 GB in fp16; the fp32 files are twice that), copy ~/.cache/huggingface here, or pass the "
              "path of a downloaded folder. Everything else in lesson 09 runs offline on the tiny pipeline.")
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


# ---------------------------------------------------------------------------
# 6. A tiny random pipeline in diffusers' own format (tests and lesson 09; needs diffusers)


TINY_WORDS = ("a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle", "cat", "dog",
              "left", "right", "of", "above", "below", "one", "two", "three", "and", "on", "with", "photo")


def tiny_tokenizer():
    """A T5 (unigram) tokenizer with a few words, built locally: no download."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0 - 0.01 * i) for i, w in enumerate(TINY_WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def save_tiny_diffusers_pipeline(folder: str | os.PathLike, seed: int = 0):
    """Build diffusers' ``Kandinsky3Pipeline`` at tiny size with random weights and ``save_pretrained`` it to
    ``folder``: the same files, layout and classes as the published model. Returns the diffusers pipeline."""
    from diffusers import DDPMScheduler, Kandinsky3Pipeline as DiffusersPipeline, Kandinsky3UNet, VQModel
    from transformers import T5Config as HFT5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = T5EncoderModel(HFT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4,
                                             num_layers=2, d_ff=64, feed_forward_proj="gated-silu"))
    unet = Kandinsky3UNet(in_channels=4, time_embedding_dim=64, groups=4, attention_head_dim=8, layers_per_block=2,
                          block_out_channels=(16, 32, 32, 64), cross_attention_dim=32, encoder_hid_dim=32)
    # The MoVQ's SpatialNorm hard-codes 32 groups: widths must be multiples of 32.
    movq = VQModel(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, vq_embed_dim=4,
                   num_vq_embeddings=64, norm_num_groups=32, norm_type="spatial", layers_per_block=1)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, thresholding=False,
                              steps_offset=1, timestep_spacing="leading", variance_type="fixed_small")
    pipe = DiffusersPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                             movq=movq)
    with torch.no_grad():
        # A random UNet is chaotic: its ε reacts so strongly to x_t that fp32 rounding (1e-6) grows ~100× per
        # sampling step and the comparison would measure the chaos, not the code. Damping its last layer makes
        # it as tame as a trained one (in fp64 the two pipelines agree to ~1e-12 either way: tests/test_kandinsky3.py).
        unet.conv_out.weight.mul_(0.1)
    for module in (text_encoder, unet, movq):
        module.eval()  # freshly built transformers models are in training mode (dropout on)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(folder))
    return pipe


# ---------------------------------------------------------------------------
# 7. A cheap preview of latents


@dataclasses.dataclass
class LatentPreview:
    """RGB ≈ W·z + b per latent pixel: a linear map fitted to what the MoVQ decodes (as Stable Diffusion UIs
    preview each step without a full decode). ``weight`` (3, C), ``bias`` (3,)."""

    weight: Tensor
    bias: Tensor

    @classmethod
    @torch.no_grad()
    def fit(cls, movq: MoVQ, images: Tensor) -> LatentPreview:
        """Least squares from the latents of ``images`` (B, 3, H, W) in [-1, 1] to their decodes, average-pooled to
        latent size."""
        param = next(movq.parameters())
        x = images.to(param.device, param.dtype)
        z = movq.encode(x)  # (B, C, h, w)
        rgb = F.adaptive_avg_pool2d(movq.decode(z).float(), z.shape[-2:])  # (B, 3, h, w)
        Z = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, C)
        Y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)  # (N, 3)
        A = torch.cat([Z, torch.ones(len(Z), 1, device=Z.device)], dim=1)  # (N, C + 1)
        solution = torch.linalg.lstsq(A.cpu(), Y.cpu()).solution  # (C + 1, 3)
        return cls(solution[:-1].T.contiguous(), solution[-1].contiguous())

    def __call__(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) latents → (B, 3, h, w) RGB in [0, 1]."""
        rgb = torch.einsum("oc,bchw->bohw", self.weight.to(latents.device), latents.float())
        return (rgb + self.bias.to(latents.device)[None, :, None, None]).mul(0.5).add(0.5).clamp(0, 1)


# ---------------------------------------------------------------------------
# 8. Memory planning


GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def weight_bytes(parameters: int, dtype: str = "bf16") -> int:
    """Bytes that ``parameters`` weights take in ``dtype`` ("fp32" 4 each, "bf16"/"fp16" 2 each)."""
    if dtype not in BYTES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(BYTES)}")
    return parameters * BYTES[dtype]


def parameter_count(module_class, config) -> int:
    """Parameters of a network built on the ``meta`` device: shapes only, no memory, no time."""
    with torch.device("meta"):
        model = module_class(config)
    return sum(p.numel() for p in model.parameters())


def published_configs() -> dict[str, tuple[type, object]]:
    """The published Kandinsky 3 networks as kandlab configs."""
    return {"text_encoder": (T5Encoder, T5Config.flan_ul2()), "unet": (UNet, UNetConfig.kandinsky3()),
            "movq": (MoVQ, MoVQConfig.kandinsky3())}


ACTIVATIONS_FILE = "measurements/kandinsky3_activations.json"  # not a model card: a subfolder


def activation_model() -> dict:
    """The fitted activation-memory model (``data/measurements/kandinsky3_activations.json``, written by
    ``scripts/k3_activations.py`` from measured runs): bytes ≈ a + b·pixels per network, measured in its ``dtype``,
    batch 2 for the guided UNet."""
    from kandlab.weights import data_dir

    path = data_dir() / ACTIVATIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python scripts/k3_activations.py` "
                                "(about 10 minutes on a 2-core CPU)")
    return json.loads(path.read_text())


@dataclasses.dataclass
class Strategy:
    name: str
    peak_gib: float  # the most GPU memory in use at any moment
    fits: bool
    cost: str  # what it costs, in words and numbers


@dataclasses.dataclass
class Plan:
    gpu_gib: float
    usable_gib: float
    dtype: str
    height: int
    width: int
    weights_gib: dict[str, float]
    activations_gib: dict[str, float]
    strategies: list[Strategy]

    @property
    def choice(self) -> Strategy | None:
        """The first (cheapest) strategy that fits; None if none does."""
        return next((s for s in self.strategies if s.fits), None)

    def __str__(self) -> str:
        lines = [f"Kandinsky 3 at {self.height}×{self.width} in {self.dtype} on a {self.gpu_gib:g} GB GPU "
                 f"(≈ {self.usable_gib:.1f} GiB usable)"]
        lines += [f"  {name:<13} weights {w:6.2f} GiB   activations ≈ {self.activations_gib[name]:5.2f} GiB (estimate)"
                  for name, w in self.weights_gib.items()]
        for s in self.strategies:
            mark = "fits" if s.fits else "does not fit"
            lines.append(f"  {'→' if s is self.choice else ' '} {s.name:<40} peak {s.peak_gib:6.2f} GiB  {mark:<12} "
                         f"{s.cost}")
        if self.choice is None:
            lines.append("  nothing here fits: use 8-bit weights or sequential (layer by layer) offload")
        return "\n".join(lines)


PCIE_GB_PER_S = 12.0  # host → GPU copy speed assumed for offload (PCIe 3/4 x16 in practice: 10–25 GB/s)
CPU_T5_S = 30.0  # stated assumption: the 8.7 B encoder on a desktop CPU, one 128-token prompt pair, bf16


def plan(gpu_gib: float, dtype: str = "bf16", height: int = 1024, width: int = 1024) -> Plan:
    """Where Kandinsky 3's three networks go on a GPU of ``gpu_gib`` GB, with the numbers behind it.

    Weight bytes come from the published configs built on ``meta``; activations from the fitted model of
    `activation_model` (an estimate: measured on a CPU at small sizes, extrapolated linearly in pixels). The
    strategies, cheapest first: everything resident; encode the prompt, then free the T5; one network on the GPU
    at a time (`Kandinsky3Pipeline.enable_model_offload`); the T5 on the CPU. 1 GB = 10⁹ bytes for the card's
    nominal size; about 0.5 GiB of it goes to the CUDA context.
    """
    if dtype not in BYTES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(BYTES)}")
    if isinstance(gpu_gib, bool) or not isinstance(gpu_gib, (int, float)) or not gpu_gib > 0:
        raise ValueError(f"gpu_gib={gpu_gib!r} must be a positive number of GB, e.g. 16 for a T4")
    h, w = latent_size(height, width)
    pixels = h * w * 64  # image pixels the MoVQ decodes (factor 8)
    nbytes = BYTES[dtype]
    weights = {name: weight_bytes(parameter_count(cls, cfg), dtype) / GIB
               for name, (cls, cfg) in published_configs().items()}
    model = activation_model()
    scale = nbytes / BYTES[model.get("dtype", "bf16")]  # activations scale with the bytes per value
    latent_pixels = h * w
    acts = {"text_encoder": model["text_encoder"]["bytes"] * scale / GIB,
            "unet": (model["unet"]["a"] + model["unet"]["b"] * latent_pixels) * scale / GIB,
            "movq": (model["movq"]["a"] + model["movq"]["b"] * pixels) * scale / GIB}
    usable = gpu_gib * 1e9 / GIB - 0.5
    t5, unet, movq = (weights[k] for k in ("text_encoder", "unet", "movq"))
    a_t5, a_unet, a_movq = (acts[k] for k in ("text_encoder", "unet", "movq"))
    moved = (t5 + unet + movq) * GIB / 1e9
    candidates = [
        ("everything resident", t5 + unet + movq + max(a_t5, a_unet, a_movq), "none: the fastest"),
        ("encode the prompt, then free the T5", max(t5 + a_t5, unet + movq + max(a_unet, a_movq)),
         f"reload {t5 * GIB / 1e9:.1f} GB of T5 per new prompt (≈ {t5 * GIB / 1e9 / PCIE_GB_PER_S:.1f} s)"),
        ("model offload (one network at a time)", max(t5 + a_t5, unet + a_unet, movq + a_movq),
         f"copy ≈ {moved:.1f} GB to the GPU per image (≈ {moved / PCIE_GB_PER_S:.1f} s at {PCIE_GB_PER_S:g} GB/s)"),
        ("T5 on the CPU, UNet and MoVQ on the GPU", unet + movq + max(a_unet, a_movq),
         f"the prompt is encoded on the CPU (≈ {CPU_T5_S:.0f} s, assumed) and needs {t5 * GIB / 1e9:.1f} GB of RAM"),
    ]
    strategies = [Strategy(name, peak, peak <= usable, cost) for name, peak, cost in candidates]
    return Plan(gpu_gib, usable, dtype, height, width, weights, acts, strategies)
