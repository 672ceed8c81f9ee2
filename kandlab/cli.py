"""Command line: ``kandlab doctor``, ``kandlab generate``, ``kandlab train``.

``kandlab generate "two red circles above a blue square" -o out.png`` samples the
shipped tiny text-to-image model offline; bad input (unknown words, empty
prompt, steps outside 1..1000, negative guidance, an unwritable output path)
is refused before any work starts, with a message and exit status 2 -- so is a request
that would not fit in memory (``-n`` images are sampled in one batch, ``--upscale``
enlarges the PNG): the message says the largest value that fits here
(`kandlab.pipeline.check_memory`, `check_png_memory`).

``kandlab doctor`` answers "will the course work here?": versions, CPU/GPU and
memory, whether the model hub is reachable (≤ ~2 s offline, never hangs), every
shipped checkpoint with its sha256 status, and whether ipywidgets is usable. It
exits non-zero when something the course needs is broken, with the fix.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
from importlib import metadata
import sys
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ["torch", "numpy", "matplotlib", "PIL", "ipywidgets", "tqdm", "safetensors", "skimage", "scipy", "tokenizers"]
OPTIONAL = ["transformers", "huggingface_hub", "jupyterlab", "diffusers", "pytest", "nbval"]
INSTALL_HINT = "pip install -e '.[dev]' (from the kandlab folder)"


@dataclass
class Finding:
    label: str
    value: str
    ok: bool = True
    fix: str = ""


def _version(module: str) -> str | None:
    """Import ``module`` (a real check that it works) and return its version."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001  (a broken install can raise anything)
        return None
    return getattr(mod, "__version__", "installed")


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _widgets_finding() -> Finding:
    version = _version("ipywidgets")
    if version is None:
        return Finding("ipywidgets", "missing", False, f"pip install 'ipywidgets>=8' or {INSTALL_HINT}")
    if int(version.split(".")[0]) < 8:
        return Finding("ipywidgets", version, False, "pip install -U 'ipywidgets>=8' (the lessons' widgets need 8+)")
    try:
        import ipywidgets

        ipywidgets.IntSlider(value=1, min=0, max=2)  # constructs without a kernel
    except Exception as err:  # noqa: BLE001
        return Finding("ipywidgets", f"{version} (broken: {err})", False, "pip install --force-reinstall 'ipywidgets>=8'")
    lab = "with jupyterlab_widgets" if _version("jupyterlab_widgets") else "jupyterlab_widgets missing"
    return Finding("ipywidgets", f"{version} usable ({lab})")


def doctor_findings() -> list[Finding]:
    from kandlab import weights

    found = [Finding("python", platform.python_version(), sys.version_info >= (3, 10), "use Python 3.10 or newer")]
    for mod in REQUIRED:
        v = _version(mod)
        found.append(Finding(mod, v or "missing", v is not None, INSTALL_HINT))
    for dist in OPTIONAL:  # metadata only: importing diffusers alone takes seconds
        try:
            found.append(Finding(dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            found.append(Finding(dist, "not installed (optional)"))

    found.append(Finding("cpu cores", str(os.cpu_count())))
    mem = _memory_gib()
    found.append(Finding("memory", f"{mem:.1f} GiB" if mem else "unknown"))
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(
                f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                for i in range(torch.cuda.device_count())
            )
        else:
            gpu = ("none — every lesson runs on the CPU; only lesson 09's opt-in last section (the published "
                   "weights) needs a GPU")
        found.append(Finding("gpu", gpu))
    except ImportError:
        pass

    online = weights.hub_reachable(timeout=2.0)
    found.append(Finding("model hub", "reachable (real weights can be loaded on request)" if online
                         else "offline — fine: the course runs on the shipped tiny models"))

    checkpoints = weights.shipped_checkpoints()
    if not checkpoints:
        found.append(Finding("tiny checkpoints", "none shipped yet"))
    for name, status in checkpoints.items():
        fix = {
            "missing": f"git checkout -- data/{name}",
            "mismatch": f"git checkout -- data/{name} (the file differs from data/{weights.MANIFEST_NAME})",
            "unlisted": "python -c 'import kandlab.weights as w; w.write_manifest()'",
        }.get(status, "")
        found.append(Finding(f"data/{name}", f"sha256 {status}", status == "ok", fix))

    found.append(_widgets_finding())
    return found


def doctor(_: argparse.Namespace) -> int:
    findings = doctor_findings()
    width = max(len(f.label) for f in findings)
    for f in findings:
        mark = "ok " if f.ok else "ERR"
        print(f"[{mark}] {f.label:<{width}}  {f.value}")
    broken = [f for f in findings if not f.ok]
    if broken:
        print("\nSomething the course needs is broken. To fix:")
        for f in broken:
            print(f"  - {f.label}: {f.fix}")
        return 1
    print("\nAll good: open the course with `jupyter lab notebooks/`.")
    return 0


def train_movq_command(args: argparse.Namespace) -> int:
    """``kandlab train movq-tiny``: the autoencoder of lesson 07 (`kandlab.train_movq`)."""
    from kandlab import train_movq

    if args.continue_shipped:
        print("--continue-shipped is for the diffusion models; a MoVQ run resumes from runs/<name>/state.pt",
              file=sys.stderr)
        return 2
    recipe = train_movq.RECIPES[args.recipe]()
    if args.steps is not None:
        recipe.steps = args.steps
    model, log = train_movq.train(recipe, run_dir=args.run_dir, resume=not args.restart)
    if args.export:
        path = train_movq.export(recipe, model, log)
        _refresh_model_cards()
        print(f"wrote {path} and its cards ({log['step']} steps in {log['seconds'] / 60:.1f} min)")
    return 0


def train_unclip_command(args: argparse.Namespace) -> int:
    """``kandlab train clip-tiny | prior-tiny | decoder-tiny``: lesson 08's models (`kandlab.train_unclip`)."""
    from kandlab import train_unclip

    if args.continue_shipped:
        print("--continue-shipped is for the diffusion models of lessons 02-07; an unCLIP run resumes from "
              "runs/<name>/state.pt", file=sys.stderr)
        return 2
    try:
        paths = train_unclip.rebuild(args.recipe, args.steps, args.run_dir, resume=not args.restart,
                                     export=args.export)
    except FileNotFoundError as err:  # a model it needs (clip_tiny, movq_tiny, latent_text) is missing
        print(f"error: {err}", file=sys.stderr)
        return 2
    if paths:
        _refresh_model_cards()
        print("wrote " + ", ".join(str(p) for p in paths) + " and their cards")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from kandlab import train, train_movq, train_unclip

    if args.steps is not None and args.steps < 1:
        print("--steps must be at least 1", file=sys.stderr)
        return 2
    if args.recipe in train_movq.RECIPES:
        return train_movq_command(args)
    if args.recipe in train_unclip.RECIPES:
        return train_unclip_command(args)
    if args.recipe not in train.RECIPES:
        known = [*train.RECIPES, *train_movq.RECIPES, *train_unclip.RECIPES]
        print(f"unknown recipe {args.recipe!r}; choose one of: {', '.join(known)}",
              file=sys.stderr)
        return 2
    staged = train.STAGES.get(args.recipe)
    if staged and args.steps is not None and not args.continue_shipped:
        plan = ", ".join(f"{name} to {make().steps}" for name, make in staged)
        print(f"kandlab train {args.recipe} rebuilds all {len(staged)} stages ({plan} steps) and takes no --steps; "
              f"to extend the shipped model, continue it: kandlab train {args.recipe} --steps N --continue-shipped "
              f"(with its last stage's recipe), or name a stage: "
              f"{', '.join(f'{args.recipe}-{name}' for name, _ in staged[1:])}", file=sys.stderr)
        return 2
    try:
        if staged and not args.continue_shipped:  # the whole rebuild, stage by stage, resumable
            recipe, ema, log = train.rebuild(args.recipe, run_dir=args.run_dir, resume=not args.restart,
                                             export_to=None if args.export else False)
            if args.export:
                _refresh_model_cards()
                print(f"wrote data/{recipe.name}.safetensors and its cards ({log['step']} steps)")
            return 0
        name, stage = args.recipe, None
        if staged:  # --continue-shipped: the shipped model extended with its last stage's recipe
            stage = staged[-1][0]
            name = f"{args.recipe}-{stage}"
        stage = stage or next((n for model, stages in train.STAGES.items() for n, _ in stages
                               if f"{model}-{n}" == args.recipe), None)  # a named stage, e.g. layout
        recipe = train.RECIPES[name]()
        if args.steps is not None:
            recipe.steps = args.steps
        continues = args.continue_shipped or name in train.CONTINUATIONS
        run_dir = Path(args.run_dir) / name if name in train.CONTINUATIONS else args.run_dir  # not stage 1's state
        ema, log = train.train(recipe, run_dir=run_dir, resume=not args.restart, from_shipped=continues, stage=stage)
    except (train.CannotContinue, FileNotFoundError) as err:  # --continue-shipped: nothing (usable) to continue
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.export:
        command = (f"kandlab train {args.recipe}" + (f" --steps {args.steps}" if args.steps is not None else "")
                   + (" --continue-shipped" if args.continue_shipped else ""))
        path = train.export(recipe, ema, log, command=command)
        _refresh_model_cards()
        print(f"wrote {path} and its cards ({log['step']} steps in {log['seconds'] / 60:.1f} min)")
    return 0


def _refresh_model_cards() -> None:
    """After an export: data/<name>.md from the new JSON card (`kandlab.cards`), then the manifest."""
    from kandlab import cards, weights

    cards.write_cards()
    weights.write_manifest()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _check_output_path(path: str) -> Path:
    """Refuse an output path we could not write, before spending time sampling."""
    out = Path(path).expanduser()
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"output {path!r} must end in {', '.join(IMAGE_SUFFIXES)} (e.g. -o out.png)")
    if out.is_dir():
        raise ValueError(f"output {path!r} is a folder; give a file name, e.g. {out / 'out.png'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write {path!r}: the folder {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"cannot write {path!r}: no permission to write there; choose another -o path")
    return out


def _grid_shape(n: int, columns: int | None = None) -> tuple[int, int]:
    """(rows, columns) of the PNG grid of ``n`` images."""
    import math

    cols = columns or min(n, int(math.ceil(math.sqrt(n))))
    return int(math.ceil(n / cols)), cols


def _grid_sides(n: int, size: int) -> tuple[int, int]:
    """(height, width) in px of the PNG grid of ``n`` images of size × size, before enlarging."""
    rows, cols = _grid_shape(n)
    gap = 2 if n > 1 else 0
    return rows * (size + gap) - gap, cols * (size + gap) - gap


def png_bytes(n: int, size: int, upscale: int) -> int:
    """Memory (bytes) `save_png_grid` needs for ``n`` images of size × size: the RGB canvas, the picture
    enlarged ``upscale`` times, and the PNG encoder's copy of it."""
    height, width = _grid_sides(n, size)
    return 3 * height * width * (1 + 2 * upscale ** 2)


def check_png_memory(n: int, size: int, upscale: int) -> None:
    """Refuse an ``--upscale`` whose picture would not fit in memory; the message says the largest that fits."""
    import math

    from kandlab.pipeline import MEMORY_SHARE, available_memory, format_bytes

    available = available_memory()
    if available is None or png_bytes(n, size, upscale) <= MEMORY_SHARE * available:
        return
    height, width = _grid_sides(n, size)
    most = max(1, math.isqrt(max(0, int((MEMORY_SHARE * available / (3 * height * width) - 1) / 2))))
    raise ValueError(f"--upscale={upscale} makes a picture of {width * upscale} × {height * upscale} px that needs "
                     f"about {format_bytes(png_bytes(n, size, upscale))} of memory, but only {format_bytes(available)} is available "
                     f"here: the largest --upscale that fits for {n} image{'s' if n > 1 else ''} is {most}")


def save_png_grid(images, path: Path, upscale: int = 4, columns: int | None = None) -> None:
    """Tile images (N, 3, H, W) in [-1, 1] into one picture (nearest-neighbour ``upscale``, 2 px gaps)."""
    import numpy as np
    from PIL import Image

    n, _, h, w = images.shape
    rows, cols = _grid_shape(n, columns)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    gap = 2 if n > 1 else 0
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        canvas[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = img
    picture = Image.fromarray(canvas)
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    picture.save(path)


def generate_unclip(args: argparse.Namespace, out: Path) -> int:
    """``kandlab generate PROMPT --model unclip``: lesson 08's two stages, prior then decoder (`kandlab.unclip`)."""
    from kandlab.unclip import UnCLIPPipeline

    if args.sampler != "ddim" or args.eta != 0.0 or args.threshold not in (None, "none") or args.start != "noise":
        raise ValueError("--model unclip samples its decoder with DDIM (η = 0) from N(0, I) and no threshold, as "
                         "Kandinsky 2.2; leave out --sampler, --eta, --threshold and --start")
    pipe = UnCLIPPipeline.from_tiny()
    guidance = 4.0 if args.guidance is None else args.guidance
    images = pipe([args.prompt] * args.num_images, steps=args.steps, guidance=guidance, seed=args.seed, progress=True)
    save_png_grid(images, out, upscale=args.upscale)
    what = "image" if args.num_images == 1 else f"grid of {args.num_images} images"
    print(f"wrote {out} ({what}: prior 25 steps, then decoder DDIM {args.steps} steps, guidance {guidance}, "
          f"seed {args.seed})")
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from kandlab import weights
    from kandlab.pipeline import Pipeline, check_memory, check_prompts, check_sampling_args
    from kandlab.tokenizer import ShapesTokenizer
    from kandlab.train_movq import tiny_movq_config
    from kandlab.unet import UNetConfig

    start = args.start.replace("-", "_")  # the CLI spells it data-mean, the Python API data_mean
    try:
        if not args.prompt.strip():
            raise ValueError("the prompt is empty; describe a scene, e.g. \"two red circles above a blue square\"")
        check_sampling_args(args.steps, 4.0 if args.guidance is None else args.guidance, args.sampler,
                            args.num_images, args.threshold or "static", start)
        if args.upscale < 1:
            raise ValueError(f"--upscale={args.upscale} must be at least 1")
        out = _check_output_path(args.output)
        check_prompts([args.prompt], ShapesTokenizer.from_shapes())  # unknown words: refused before loading
        if args.model == "unclip":
            check_png_memory(args.num_images, 64, args.upscale)
            return generate_unclip(args, out)
        weights.tiny_path(f"{args.model}.safetensors")  # missing or corrupted: says how to restore it
        card = weights.load_card(f"{args.model}.safetensors")
        guidance = card.get("recipe", {}).get("guidance", 4.0) if args.guidance is None else args.guidance
        if "unet_config" in card:  # memory: from the card's config, before loading the weights (from_tiny
            size = card["recipe"]["image_size"]  # refuses a card without one)
            latent = card["recipe"].get("latent")
            side = size // tiny_movq_config(latent).downsample_factor if latent else size  # what the UNet denoises
            check_memory(args.num_images, UNetConfig(**card["unet_config"]), side, guidance, args.steps)
            check_png_memory(args.num_images, size, args.upscale)
        pipe = Pipeline.from_tiny(args.model)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"kandlab generate: {err}", file=sys.stderr)
        return 2
    images = pipe(args.prompt, steps=args.steps, guidance=guidance, sampler=args.sampler, seed=args.seed,
                  images_per_prompt=args.num_images, threshold=args.threshold, eta=args.eta, start=start)
    save_png_grid(images, out, upscale=args.upscale)
    what = "image" if args.num_images == 1 else f"grid of {args.num_images} images"
    print(f"wrote {out} ({what}, {args.sampler} {args.steps} steps, guidance {guidance}, seed {args.seed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kandlab", description="kandlab course tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check that this machine can run the course")
    p.set_defaults(func=doctor)
    p = sub.add_parser("generate", help="text → image with the shipped tiny model (offline)")
    p.add_argument("prompt", help='a shapes caption, e.g. "two red circles above a blue square"')
    p.add_argument("-o", "--output", default="out.png", help="PNG/JPEG file to write (default: out.png)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images to sample; more than one makes a grid")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps, 1..1000 (default 50)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="sampler (default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise η (0 deterministic, 1 DDPM-like)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale s ≥ 0 (1 = none; default: the model card's, 4 = Kandinsky 3's "
                        "w = 3 for pixel_text)")
    p.add_argument("--threshold", default=None, choices=["static", "dynamic", "none"],
                   help="x̂₀ thresholding (default: static for a pixel model, as Kandinsky 3 in diffusers; none for a "
                        "latent model, whose latents have no fixed range)")
    p.add_argument("--start", default="noise", choices=["noise", "data-mean"],
                   help="where sampling starts: N(0, I) as Kandinsky 3 (default), or around the shapes world's "
                        "mean pixel, which draws fewer stray shapes (lesson 02)")
    p.add_argument("--upscale", type=int, default=4, help="nearest-neighbour enlargement of the 32×32 output (default 4)")
    p.add_argument("--model", default="pixel_text", help="shipped model in data/: pixel_text (32×32, the default), "
                                                         "latent_text (64×64 from MoVQ latents, lesson 07) or unclip "
                                                         "(prior + decoder, 64×64, lesson 08)")
    p.set_defaults(func=generate_command)
    p = sub.add_parser("train", help="rebuild a shipped tiny model from its recipe")
    p.add_argument("recipe", help="pixel-uncond, or pixel-text (all its stages: base, layout, anneal, decay; "
                                  "resumable, state in runs/ per stage), or one later stage of pixel-text on its own: "
                                  "pixel-text-layout, pixel-text-anneal, pixel-text-decay (each continues "
                                  "data/pixel_text.safetensors, state in runs/<recipe>/); movq-tiny (lesson 07's "
                                  "autoencoder) and latent-text (its latent text-to-image model, after movq-tiny; "
                                  "two stages, base and polish, or latent-text-polish alone); clip-tiny, prior-tiny (with its "
                                  "regression baseline) and decoder-tiny (lesson 08's unCLIP, in that order; the decoder in "
                                  "two stages, base and polish, or decoder-tiny-polish alone, which continues "
                                  "data/decoder_tiny)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    p.add_argument("--run-dir", default="runs", help="where state, logs and sample grids go (default: runs/)")
    p.add_argument("--restart", action="store_true", help="ignore a saved state and start from scratch")
    p.add_argument("--no-export", dest="export", action="store_false", help="do not write data/<name>.*")
    p.add_argument("--continue-shipped", action="store_true",
                   help="with no saved state, start from data/<name>.safetensors (same recipe, fewer steps) "
                        "instead of step 0; use with --steps to extend a shipped model (a staged one, pixel-text, "
                        "with its last stage's recipe)")
    p.set_defaults(func=train_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
