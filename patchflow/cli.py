"""`patchflow train | distill | sample | eval | cache | encoder | convert | lora | plan | demo | serve | report`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path



def cmd_train(args) -> None:
    from patchflow.config import load_config
    from patchflow.train.run import train

    cfg = load_config(args.config, args.set)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    train(cfg, out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once
        print(f"run written to {out}")


def cmd_distill(args) -> None:
    from patchflow.config import load_config
    from patchflow.train.distill import student_config
    from patchflow.train.run import train

    out = Path(args.out or Path(args.run_dir).with_name(f"{Path(args.run_dir).name}-{args.steps}step"))
    if args.resume and (out / "config.toml").is_file():  # a student continues with the config it was started with
        cfg = load_config(out / "config.toml", args.set)
        if Path(cfg.distill.teacher).resolve() != Path(args.run_dir).resolve():
            raise ValueError(f"--resume: {out} is a student of {cfg.distill.teacher}, not of {args.run_dir}")
    else:
        cfg = student_config(args.run_dir, args.steps, args.method, args.set)
    train(cfg, out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        print(f"student written to {out}: `patchflow sample {out}` samples in {cfg.distill.steps} steps")


def cmd_sample(args) -> None:
    from patchflow.cli_sample import cmd_sample as sample

    sample(args)


def cmd_eval(args) -> None:
    from patchflow.cli_sample import check_sampling_args
    from patchflow.evaluate.dispatch import EvalOptions, evaluate_source

    check_sampling_args(args)
    result = evaluate_source(args.source, EvalOptions(
        per_class=args.per_class, prompts=args.prompts, frames=args.frames, curve=args.curve, seed=args.seed,
        steps=args.steps, guidance=args.guidance, sampler=args.sampler, device=args.device, ema=not args.no_ema,
        progress=not args.quiet))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def cmd_convert(args) -> None:
    from patchflow.convert.dit import convert_diffusers_dit, convert_official_dit

    if args.num_heads is not None and args.num_heads < 1:
        raise ValueError(f"--num-heads must be >= 1, got {args.num_heads}")
    if args.num_heads is not None and args.kind != "dit-official":
        raise ValueError(f"--num-heads is for dit-official checkpoints; {args.kind} reads the heads from config.json")
    if args.pipeline is not None and args.kind != "diffusers-sd3":
        raise ValueError(f"--pipeline is for diffusers-sd3 imports; {args.kind} takes no text encoders or VAE")
    if args.kind in ("diffusers-sd3", "to-diffusers-sd3"):
        from patchflow.convert.sd3 import export_diffusers_sd3, import_diffusers_sd3

        if args.kind == "diffusers-sd3":
            print(f"wrote run directory {import_diffusers_sd3(args.source, args.out_dir, pipeline=args.pipeline)}")
        else:
            print(f"wrote diffusers SD3Transformer2DModel folder {export_diffusers_sd3(args.source, args.out_dir)}")
        return
    if args.kind == "dit-official":
        out = convert_official_dit(args.source, args.out_dir, num_heads=args.num_heads)
    else:
        out = convert_diffusers_dit(args.source, args.out_dir)
    print(f"wrote run directory {out}")


def cmd_cache(args) -> None:
    from patchflow.config import ConfigError, load_config
    from patchflow.data.latent_cache import CacheError, build_cache, check_cache, default_cache_dir, shapes_text
    from patchflow.train.codec import check_model_codec
    from patchflow.train.run import ensure_codec

    cfg = load_config(args.config, args.set)
    if cfg.kind.codec:
        raise ConfigError(f"{args.config} trains a codec on pixels; `patchflow cache` takes the config of a run "
                          f"that trains on a codec's latents (codec.source set)")
    if args.features:
        return cache_features(cfg, args)
    if cfg.codec.source == "identity":
        raise ConfigError(f"{args.config} has codec.source = \"identity\": it trains on pixels, which need no "
                          f"cache; set codec.source to a codec (e.g. --set codec.source=\"codec-digits\")")
    codec = ensure_codec(cfg.codec.source, progress=not args.quiet)
    check_model_codec(cfg, codec)
    setting = cfg.codec.cache.strip()
    if args.out:
        directory = Path(args.out)
    elif setting not in ("auto", "off"):
        directory = Path(setting).expanduser()
    else:
        directory = default_cache_dir(cfg.data, codec.identity())
    if (directory / "cache.json").is_file() and not args.force:
        try:
            meta = check_cache(directory, cfg.data, codec.identity())
            print(f"latent cache {directory} is up to date ({meta['items']} items, latents "
                  f"{shapes_text(meta)}); --force rebuilds it")
            return
        except CacheError as e:
            print(f"rebuilding: {e}")
    t0 = time.perf_counter()
    build_cache(directory, cfg.data, codec, progress=not args.quiet)
    meta = check_cache(directory, cfg.data, codec.identity())
    print(f"wrote {meta['items']} latents {shapes_text(meta)} of {cfg.data.dataset} to {directory} in "
          f"{time.perf_counter() - t0:.1f}s")
    if setting == "off":
        print("note: this config has codec.cache = \"off\"; set codec.cache = \"auto\" or the folder to use it")


def cache_features(cfg, args) -> None:
    """`patchflow cache CONFIG --features [DIR]`: REPA's encoder features of the data, for repa.cache."""
    from patchflow.config import ConfigError
    from patchflow.data.feature_cache import feature_dataset
    from patchflow.train.inputs import feature_grid
    from patchflow.train.run import ensure_codec
    from patchflow.vision import load_vision_encoder

    if not cfg.repa.enabled:
        raise ConfigError(f"{args.config} has no repa.encoder: set one (e.g. --set repa.encoder=\"world\") to cache "
                          f"its features")
    codec = None if cfg.codec.source == "identity" else ensure_codec(cfg.codec.source, progress=not args.quiet)
    encoder = load_vision_encoder(cfg.repa.encoder, cfg.data, progress=not args.quiet,
                                  world_steps=cfg.repa.world_steps)
    t0 = time.perf_counter()
    per_token, latent_frames = feature_grid(cfg, codec)
    into = None if args.features == "auto" else Path(args.features).expanduser()
    if into is not None and args.force and (into / "cache.json").is_file():
        (into / "cache.json").unlink()  # built again below
    features = feature_dataset(cfg, encoder, per_token, latent_frames, progress=not args.quiet, into=into)
    print(f"features of {len(features)} {cfg.data.dataset} items ({encoder.name}, {per_token} px per token) in "
          f"{features.directory}, {time.perf_counter() - t0:.1f}s; a run reads them with repa.cache = "
          f"\"{features.directory}\" (or \"auto\")")


def cmd_encoder(args) -> None:
    """`patchflow encoder CONFIG --out DIR`: a world encoder (REPA's teacher) trained on the config's data."""
    from dataclasses import replace

    from patchflow.config import load_config
    from patchflow.vision import WorldRecipe, train_world_encoder

    cfg = load_config(args.config, args.set)
    recipe = WorldRecipe(steps=cfg.repa.world_steps)  # the encoder `repa.encoder = "world"` would train
    for key in ("steps", "batch_size"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            recipe = replace(recipe, **{key: value})
    t0 = time.perf_counter()
    out = train_world_encoder(cfg.data, args.out, recipe, progress=not args.quiet)
    print(f"world encoder of {cfg.data.dataset} ({recipe.dim}-d features) written to {out} in "
          f"{time.perf_counter() - t0:.1f}s; use it with repa.encoder = \"{out}\"")


def cmd_lora(args) -> None:
    from patchflow.lora.apply import merge_run, read, write
    from patchflow.run_dir import load_run_config

    if args.action == "merge":
        if not args.adapters:
            raise ValueError("patchflow lora merge RUN A.safetensors[:scale] ... --out DIR: give at least one adapter "
                             "(or merge a LoRA run's own with its run directory as RUN and A)")
        print(f"wrote run directory {merge_run(args.run_dir, args.adapters, args.out)}")
    else:
        if args.adapters:
            raise ValueError("patchflow lora export RUN --out FILE takes no adapter files")
        out = Path(args.out)
        if args.format == "diffusers" and not out.suffix:  # a folder, as diffusers' save_lora_weights writes
            out = out / "pytorch_lora_weights.safetensors"
            out.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote adapter {write(read(args.run_dir), load_run_config(args.run_dir).model, args.format, out)}")


def cmd_plan(args) -> None:
    from patchflow.config import load_config
    from patchflow.plan import format_plan, make_plan, parse_memory

    memory = parse_memory(args.memory) if args.memory else None
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if any(not 1 <= b <= 2**31 for b in args.batch):
        raise ValueError(f"--batch sizes must be in 1..2**31, got {args.batch}")
    cfg = load_config(args.config, args.set)
    if cfg.kind.codec:
        raise ValueError(f"patchflow plan sizes diffusion transformers; {args.config} trains a codec "
                         f"(model.arch = \"autoencoder\")")
    print(format_plan(cfg, make_plan(cfg), memory, args.batch, args.checkpoint_every))


def cmd_demo(args) -> None:
    from patchflow.train.demo import run_demo

    run_demo(args.world, args.out, args.set, resume=args.resume, progress=not args.quiet)


def cmd_serve(args) -> None:
    from patchflow.cli_sample import check_device
    from patchflow.serve import serve

    check_device(args.device)
    serve(args.runs, host=args.host, port=args.port, device=args.device, max_queue=args.max_queue,
          use_ema=not args.no_ema, token=args.token or os.environ.get("PATCHFLOW_SERVE_TOKEN") or None,
          loras=args.lora)


def cmd_report(args) -> None:
    from patchflow.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"report written to {path}")


def _add_sampling_flags(p) -> None:
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--sampler", help="euler | heun (flows); ddpm | ddim (diffusion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchflow", description="Train and sample diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a TOML config")
    p.add_argument("config", help="a TOML file or a shipped preset name (e.g. digits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=2000")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("distill", help="train a few-step student of a diffusion run (any kind, flow or DDPM)")
    p.add_argument("run_dir", help="the teacher's run directory")
    p.add_argument("--steps", type=int, default=4, help="the student's sampling steps (default 4)")
    p.add_argument("--method", choices=("trajectory", "progressive"), default=None,
                   help="distill.method (default trajectory)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. train.steps=400 or distill.guidance=4")
    p.add_argument("--out", help="the student's run directory (default RUN-<N>step beside the teacher)")
    p.add_argument("--resume", action="store_true", help="continue the student in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("sample", help="sample images or clips from a run")
    p.add_argument("run_dir")
    p.add_argument("--label", type=int, help="class to sample (class-conditional runs)")
    p.add_argument("--n", type=int, default=16, help="samples of --label or --prompt")
    p.add_argument("--labels-all", type=int, metavar="N", help="N samples of every class")
    p.add_argument("--prompt", help="text to sample (text-to-image runs)")
    p.add_argument("--prompts-file", help="one prompt a line, one sample each (blank lines and # lines skipped)")
    p.add_argument("--negative-prompt", help="what to steer away from (replaces the empty prompt of guidance)")
    p.add_argument("--size", metavar="HxW", help="image size in pixels, e.g. 32x48 (default: the training size; "
                                                 "text models sample other sizes and aspect ratios)")
    p.add_argument("--out", required=True, help=".png grid or .npz (images uint8 (N,H,W,C), and labels (N,) or "
                                                "prompts (N,)); video runs: .gif or .mp4 (a clip, or a grid of clips), "
                                                ".npz (videos uint8 (N,T,H,W,3) and prompts (N,)) or .png (frames)")
    p.add_argument("--frames", type=int, help="video runs: frames per clip (default: the training length)")
    p.add_argument("--first-frame", metavar="IMAGE", help="video runs: animate this still (image-to-video)")
    p.add_argument("--extend", metavar="CLIP", help="video runs: continue this clip (.gif, .mp4 or .npz)")
    p.add_argument("--video-to-video", metavar="CLIP", help="video runs: redraw this clip after the prompt (SDEdit)")
    p.add_argument("--init-image", metavar="IMAGE", help="image runs: edit this image after the prompt or label "
                                                         "(image-to-image, SDEdit); fitted to --size")
    p.add_argument("--mask", metavar="MASK", help="with --init-image or --video-to-video: redraw only the white part "
                                                  "(inpainting, outpainting); a clip of masks gives one per frame")
    p.add_argument("--strength", type=float, help="with --init-image or --video-to-video: how much is redrawn, in "
                                                  "[0, 1] (0 keeps the input; default 0.7, 1 with --mask)")
    p.add_argument("--lora", action="append", default=[], metavar="ADAPTER[:SCALE]",
                   help="merge an adapter (a patchflow adapter file or a LoRA run) at this strength (default 1); "
                        "repeat to stack adapters")
    _add_sampling_flags(p)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("eval", help="score a digits or color-digits run (or an .npz of samples), or a codec run's "
                                    "reconstructions")
    p.add_argument("source", help="run directory or .npz written by `patchflow sample`")
    p.add_argument("--per-class", type=int, default=100,
                   help="samples per class when sampling a run (a codec run: 5x this many held-out items)")
    p.add_argument("--prompts", type=int, default=500,
                   help="text runs: held-out canonical prompts to sample (paraphrases and numbers scale with it)")
    p.add_argument("--frames", type=int, help="video runs: frames per scored clip (default 8)")
    p.add_argument("--curve", action="store_true",
                   help="score every kept checkpoint (the learning curve): text and video runs on --prompts "
                        "prompts, digits runs on --per-class samples per class")
    p.add_argument("--json", help="also write the figures to this JSON file")
    _add_sampling_flags(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("convert", help="import third-party DiT / SD3 weights into a run directory, or export an "
                                       "MMDiT run to diffusers")
    p.add_argument("kind", choices=["dit-official", "diffusers-dit", "diffusers-sd3", "to-diffusers-sd3"],
                   help="dit-official, diffusers-dit, diffusers-sd3: import into a new run directory; "
                        "to-diffusers-sd3: export an MMDiT run (EMA weights) as an SD3Transformer2DModel folder")
    p.add_argument("source", help="official checkpoint (.pt/.pth/.safetensors), a diffusers model or pipeline "
                                  "folder, or (to-diffusers-sd3) a run directory")
    p.add_argument("out_dir")
    p.add_argument("--num-heads", type=int, help="heads, when the hidden size is not one of DiT-S/B/L/XL")
    p.add_argument("--pipeline", metavar="PIPELINE_DIR",
                   help="diffusers-sd3: take the text encoders, VAE and scheduler shift from this "
                        "StableDiffusion3Pipeline folder (for a transformer folder saved on its own, e.g. a fine-tune)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("cache", help="precompute a data set's latents once for a run on a codec")
    p.add_argument("config", help="a TOML file or a shipped preset name (e.g. digits-latent)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="cache folder (default: codec.cache when it is a folder, else $PATCHFLOW_CACHE/latents/...)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    p.add_argument("--features", nargs="?", const="auto", metavar="DIR",
                   help="instead: REPA's encoder features (repa.encoder) of the data, into $PATCHFLOW_CACHE or DIR")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("encoder", help="train a world encoder (REPA's frozen teacher) on a config's data")
    p.add_argument("config", help="a TOML file or a shipped preset name: its [data] section is trained on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="directory to write (encoder.json, encoder.safetensors)")
    p.add_argument("--steps", type=int, help="training steps (default: the config's repa.world_steps, 200 unless set)")
    p.add_argument("--batch-size", type=int, help="images per step (default 128)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_encoder)

    p = sub.add_parser("lora", help="bake adapters into a run (merge) or write a LoRA run's adapter file (export)")
    p.add_argument("action", choices=("merge", "export"))
    p.add_argument("run_dir", help="merge: the run to bake into (a LoRA run bakes its own adapter in too); export: a "
                                   "LoRA run")
    p.add_argument("adapters", nargs="*", metavar="ADAPTER[:SCALE]", help="merge: adapter files or LoRA runs")
    p.add_argument("--out", required=True, help="merge: a new run directory; export: a .safetensors adapter file "
                                                "(diffusers: or a folder, given pytorch_lora_weights.safetensors)")
    p.add_argument("--format", choices=("patchflow", "diffusers", "kohya"), default="patchflow",
                   help="export: patchflow's file; diffusers/PEFT (SD3); kohya/ComfyUI (SD3, DiT)")
    p.set_defaults(fn=cmd_lora)

    p = sub.add_parser("plan", help="parameters, FLOPs, memory per batch size, largest batch that fits")
    p.add_argument("config", help="a TOML file or a shipped preset name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--memory", help="device memory, e.g. 80GB: prints the largest batch that fits")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128, 256], help="batch sizes to tabulate")
    p.add_argument("--checkpoint-every", type=int, default=1, help="activation checkpointing every k-th block")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("demo", help="train a preset on this machine, write a sample grid and score it")
    p.add_argument("world", nargs="?", default="digits", choices=["digits", "color-digits", "moving-digits"],
                   help="digits (class-conditional, a few minutes), color-digits (text-to-image) or moving-digits "
                        "(text-to-video)")
    p.add_argument("--out", help="run directory (default runs/demo, runs/demo-color-digits, "
                                 "runs/demo-moving-digits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("serve", help="a local web studio and HTTP API (POST /api/generate) over one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories to serve (the page offers a choice)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting at most; more get 503 (try later)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--lora", action="append", default=[], metavar="[NAME=]ADAPTER",
                   help="an adapter requests may pick by NAME (\"lora\", \"lora_scale\"), offered for the runs it "
                        "fits; repeat for more (default name: the file's stem)")
    p.add_argument("--token",
                   help="the API then needs it: 'Authorization: Bearer TOKEN', or open /?token=TOKEN once in a "
                        "browser (default: $PATCHFLOW_SERVE_TOKEN; none = open)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("report", help="one self-contained HTML page of a run: curves, samples, eval, config")
    p.add_argument("run_dir")
    p.add_argument("--out", help="HTML file to write (default RUN/report.html)")
    p.set_defaults(fn=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = run(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of torchrun's processes
        # skip interpreter teardown: freeing the model after the process group is gone can abort in gloo's worker
        # threads (SIGABRT); every file is closed and every checkpoint written by now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(args: argparse.Namespace) -> int:
    """The chosen command; returns its exit code."""
    from patchflow.train.errors import TrainingError  # no torch: keeps `--help` fast

    try:
        args.fn(args)
    except (ValueError, OSError, KeyError, ImportError, TrainingError) as e:  # OSError: also a path too long, a
        # folder, no access; ImportError: an optional package (a video writer) that is not installed
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"patchflow {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130
    except SystemExit as e:  # train's SIGTERM stop (exit code 75) has printed its message already
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
