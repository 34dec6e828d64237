"""The `flashdiff` command line: generate, convert, models."""

import argparse
import sys

from .errors import FlashdiffError

EPILOG = """examples:
  flashdiff generate --model flux-schnell --prompt "a red fox in snow" --steps 4 --seed 7 -o fox.png
  flashdiff generate --model flux-dev --quantize 4 --prompt "..." --seed 1 2 3 -o out.png
  flashdiff generate --model qwen-image --prompt 'a neon sign that says "OPEN 24/7"' --aspect 16:9 -o sign.png
  flashdiff generate --model qwen-image -q 4 --prompt "..." --negative-prompt "blurry" --true-cfg 4 -o out.png
  flashdiff generate --model demo --prompt "anything" -o demo.png     (offline, tiny random model)
  flashdiff convert --model flux-dev --quantize 4 -o flux-dev-q4
  flashdiff models
"""


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _add_model_args(p, quant_help, model_required=True):
    p.add_argument("--model", "-m", required=model_required,
                   help="preset (see `flashdiff models`: flux-schnell, flux-dev, qwen-image), Hugging Face repo id, "
                        "local diffusers/convert folder, or a BFL single-file checkpoint (flux1-dev.safetensors)")
    p.add_argument("--base", help="for a single-file checkpoint: a diffusers folder with its text encoders, tokenizers and VAE "
                                   "(default: download them from the matching repo)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="compute dtype (default bfloat16)")
    p.add_argument("--quantize", "-q", type=int, choices=[2, 3, 4, 5, 6, 8], help=quant_help)
    p.add_argument("--group-size", type=int, help="quantization group size (default 64 for affine; fixed by the fp modes)")
    p.add_argument("--mode", choices=["affine", "mxfp4", "nvfp4", "mxfp8"], help="quantization mode (default affine)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="flashdiff", description="MLX diffusion engine: FLUX.1 and Qwen-Image text-to-image.",
                                     epilog=f"models (presets) and their defaults:\n{models_text()}\n\n{EPILOG}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"flashdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{generate,convert,models}")

    g = sub.add_parser("generate", help="generate images from a prompt", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(g, "quantize weights on load to this many bits", model_required=False)
    g.add_argument("--prompt", "-p", help="the prompt (required unless --from-image gives it)")
    g.add_argument("--from-image", metavar="PNG",
                   help="re-run the generation recorded in a flashdiff PNG (model, prompt, seed, sizes, steps, ...); "
                        "options given on the command line override what it recorded")
    g.add_argument("--negative-prompt", help="negative prompt, used with --true-cfg > 1 (default: the model's; "
                                             "Qwen-Image: \" \")")
    g.add_argument("--true-cfg", type=float, help="true classifier-free guidance scale; > 1 enables it with a negative "
                                               "prompt (default: the model's; Qwen-Image 4.0, FLUX 1 = off)")
    g.add_argument("--steps", "-s", type=_positive_int, help="denoising steps (default: the model's)")
    g.add_argument("--guidance", "-g", type=float, help="distilled guidance scale (FLUX-dev; default: the model's)")
    g.add_argument("--height", type=_positive_int, help="image height, a multiple of 16 (default: the model's)")
    g.add_argument("--width", type=_positive_int, help="image width, a multiple of 16 (default: the model's)")
    g.add_argument("--aspect", help="a named size of the model instead of --height/--width, e.g. 16:9 "
                                    "(Qwen-Image: 1:1 16:9 9:16 4:3 3:4 3:2 2:3; see `flashdiff models`)")
    g.add_argument("--seed", type=int, nargs="+", help="one or more seeds; one image per seed (default: random)")
    g.add_argument("--num-images", "-n", type=_positive_int, default=None,
                   help="images per seed list (with one seed: seeds seed, seed+1, ...)")
    g.add_argument("--max-sequence-length", type=_positive_int,
                   help="text tokens (default: the model's; at most 512 for FLUX's T5, 1024 for Qwen-Image)")
    g.add_argument("--keep-text-encoders", action="store_true", help="keep text encoders in memory")
    g.add_argument("--low-memory", action="store_true", help="release each component after use")
    g.add_argument("--vae-tiling", action="store_true",
                   help="decode in overlapping 512-pixel tiles: bounded VAE memory at large sizes")
    g.add_argument("--output", "-o", default="image.png", help="output file (.png keeps the parameters as metadata)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("convert", help="write a self-contained (optionally quantized) model folder")
    _add_model_args(c, "quantize the transformer and the large text encoder (T5 / Qwen2.5-VL) to this many bits")
    c.add_argument("--output", "-o", required=True, help="output folder (must not exist or be empty)")
    c.add_argument("--quiet", action="store_true")

    sub.add_parser("models", help="list model presets")
    return parser


# metadata field -> command-line option, for --from-image
_RERUN_FIELDS = ("model", "prompt", "negative_prompt", "true_cfg", "steps", "guidance", "height", "width",
                 "max_sequence_length", "dtype")


def apply_recorded_settings(args):
    """Fill the options not given on the command line from the PNG named by --from-image."""
    from .images import read_metadata

    meta = read_metadata(args.from_image)
    for field in _RERUN_FIELDS:
        if field in ("height", "width") and args.aspect is not None:
            continue  # a new --aspect replaces the recorded size
        if getattr(args, field) is None and meta.get(field) is not None:
            setattr(args, field, meta[field])
    if meta.get("transformer_file") and args.model == meta.get("model"):
        args.model = meta["transformer_file"]  # a single-file checkpoint; its base comes from --base or the Hub
    if args.seed is None and meta.get("seed") is not None:
        args.seed = [meta["seed"]]
    if args.quantize is None and meta.get("quantize"):
        q = meta["quantize"] if isinstance(meta["quantize"], dict) else {}
        args.quantize, args.group_size, args.mode = q.get("bits"), args.group_size or q.get("group_size"), args.mode or q.get("mode")
    if meta.get("vae_tiling"):
        args.vae_tiling = True


def cmd_generate(args):
    from .images import check_output_path, output_paths, save_image
    from .pipeline import Pipeline

    if args.from_image:
        apply_recorded_settings(args)
    if not args.model or args.prompt is None:
        raise FlashdiffError("generate needs --model and --prompt (or --from-image with a PNG that flashdiff wrote)")

    seeds = args.seed
    n = args.num_images or (len(seeds) if seeds else 1)
    if seeds and len(seeds) > 1 and args.num_images and args.num_images != len(seeds):
        raise FlashdiffError(f"--num-images {args.num_images} does not match the {len(seeds)} seeds given")
    if seeds and len(seeds) == 1 and n > 1:  # --seed S -n N: seeds S, S+1, ... (what the pipeline does), named so
        seeds = [seeds[0] + i for i in range(n)]
    seed = seeds if seeds and len(seeds) > 1 else (seeds[0] if seeds else None)
    paths = output_paths(args.output, n, seeds if seeds and len(seeds) == n else None)
    for path in paths:  # fail before any model is loaded, not after the images are made
        check_output_path(path)
    if args.aspect is not None:
        _check_aspect(args)
    pipe = Pipeline.from_pretrained(args.model, dtype=args.dtype or "bfloat16", quantize=args.quantize,
                                    group_size=args.group_size, mode=args.mode or "affine", base=args.base,
                                    keep_text_encoders=args.keep_text_encoders,
                                    low_memory=args.low_memory, vae_tiling=args.vae_tiling)
    images = pipe.generate(args.prompt, negative_prompt=args.negative_prompt, true_cfg=args.true_cfg, steps=args.steps,
                           guidance=args.guidance, height=args.height, width=args.width, seed=seed, num_images=n,
                           max_sequence_length=args.max_sequence_length, aspect=args.aspect, progress=not args.quiet)
    if len(paths) > 1 and seeds is None:
        paths = output_paths(args.output, n, [img.info["flashdiff"]["seed"] for img in images])
    for img, path in zip(images, paths):
        save_image(img, path)
        meta = img.info["flashdiff"]
        print(f"wrote {path}  (seed {meta['seed']}, {meta['steps']} steps, {meta['seconds']} s)")


def _check_aspect(args):
    """Reject a bad --aspect before anything is downloaded or loaded (the pipeline checks it again)."""
    from .sources import presets

    if args.height is not None or args.width is not None:
        raise FlashdiffError("pass either --aspect or --height/--width, not both")
    preset = presets().get(args.model)
    if preset is not None:
        table = preset.get("aspect_ratios") or {}
        if args.aspect not in table:
            known = f"it knows {', '.join(table)}" if table else "it has no aspect-ratio table; use --height/--width"
            raise FlashdiffError(f"unknown aspect ratio {args.aspect!r} for {args.model}: {known}")


def cmd_convert(args):
    from pathlib import Path

    from .pipeline import Pipeline

    out = Path(args.output).expanduser()
    if out.exists() and not out.is_dir():
        raise FlashdiffError(f"{out} is a file; --output of convert is a folder (new, or empty)")
    if out.exists() and any(out.iterdir()):
        raise FlashdiffError(f"{out} already exists and is not empty; choose a new folder")
    pipe = Pipeline.from_pretrained(args.model, dtype=args.dtype or "bfloat16", quantize=args.quantize,
                                    group_size=args.group_size, mode=args.mode or "affine", base=args.base)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    try:
        pipe.save_pretrained(tmp, progress=not args.quiet)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    q = f"{pipe.quantization.bits}-bit {pipe.quantization.mode}" if pipe.quantization else (args.dtype or "bfloat16")
    print(f"wrote {out} ({q}); use it with: flashdiff generate --model {out} --prompt ...")


def models_text() -> str:
    """The presets with their defaults (for `flashdiff models` and `flashdiff --help`)."""
    from .sources import presets

    lines = []
    for name, p in sorted(presets().items()):
        d = p.get("defaults", {})
        where = p.get("repo_id", "built locally")
        cfg = f"guidance {d.get('guidance')}" if "guidance" in d else ""
        if d.get("true_cfg", 1.0) > 1:
            cfg = f"true_cfg {d['true_cfg']} (negative prompt {d.get('negative_prompt')!r})"
        lines.append(f"{name:14s} {where:36s} steps {d.get('steps')}, {cfg}, {d.get('width')}x{d.get('height')}")
        lines.append(f"{'':14s} {p.get('description', '')}")
        if p.get("aspect_ratios"):
            # rendered at multiples of 16, as diffusers does (the card's 1472x1140 renders 1472x1136)
            sizes = ", ".join(f"{k} {w // 16 * 16}x{h // 16 * 16}" for k, (w, h) in p["aspect_ratios"].items())
            lines.append(f"{'':14s} --aspect: {sizes}")
    return "\n".join(lines)


def cmd_models(args):
    print(models_text())


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        {"generate": cmd_generate, "convert": cmd_convert, "models": cmd_models}[args.command](args)
    except FlashdiffError as e:
        print(f"flashdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashdiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
