"""`edgemm compile`: builds a CompileConfig and hands it to edgemm.pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..config import CompileConfig
from .options import FINITE_FLOAT, verbose_option


@click.command("compile")
@click.argument("model", required=False)
@click.option("-o", "--output", help="Bundle folder (default engines/<model-name>).")
@click.option("--name", help="Bundle name (default from the model file).")
@click.option("--fp32", "precision", flag_value="fp32", help="Full precision (default).")
@click.option("--fp16", "precision", flag_value="fp16", help="Half precision.")
@click.option("--int8", "precision", flag_value="int8", help="INT8, calibrated with --calib.")
@click.option("--fp8", "precision", flag_value="fp8", help="FP8 E4M3 (TensorRT targets with CC >= 8.9).")
@click.option("--precision", "precision_spec", help="Per-branch precisions, e.g. vision=int8,text=fp16,fusion=fp32.")
@click.option("--branch", multiple=True, help="Override branch detection: BRANCH=MODULE_PATTERN, e.g. text=text_encoder.*")
@click.option("--accuracy-target", help="Keep the most sensitive layers in float until met, e.g. 'cosine>=0.998'.")
@click.option("--calib", type=click.Path(), help="Calibration .npz (or folder): keys = input names, axis 0 = samples.")
@click.option("--eval", "eval_", type=click.Path(), help="Evaluation .npz: verify the bundle at the end.")
@click.option("--target", default="cpu", show_default=True, help="Target device profile (see `edgemm targets`).")
@click.option("--weights", type=click.Path(), help="Weights for a package.module:function factory.")
@click.option("--trust-pickle", is_flag=True,
              help="Trust the model file's code: unpickle a full nn.Module, run TorchScript/.pt2 operators beyond "
                   "pure tensor math (file I/O, Python calls). Never read from --config.")
@click.option("--input", "inputs", multiple=True, help="NAME:SHAPE:DTYPE, e.g. image:1x3x224x224:float32.")
@click.option("--dynamic", multiple=True, help="NAME:AXIS=MIN:OPT:MAX, e.g. input_ids:1=1:77:128.")
@click.option("--output-names", help="Comma-separated names for the model's outputs, in order.")
@click.option("--static-batch", is_flag=True,
              help="Keep the batch dimension fixed (.pt2 and .onnx models keep their own dims).")
@click.option("--max-batch", type=int, default=None,
              help="Largest batch, at most 65536 (optimization profiles; default 64, or a .pt2/.onnx model's own bound).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="Exporter to try first.")
@click.option("--int8-recipe", help="Pin a CPU INT8 recipe by name instead of searching.")
@click.option("--exclude", multiple=True, metavar="PATTERN[,PATTERN]",
              help="Keep nodes out of INT8/FP8: op:TYPE (op:Softmax), module:GLOB (module:text.encoder.*), "
                   "or a regex on whole node names ('/text/.*').")
@click.option("--min-cosine", type=FINITE_FLOAT, help="Accuracy bar for recipe search and verification.")
@click.option("--min-top1", type=FINITE_FLOAT, help="Least top-1 agreement of class-score outputs (0..1).")
@click.option("--max-metric-drop", type=FINITE_FLOAT,
              help="Task-metric drop (points) --eval verification allows (default per precision).")
@click.option("--calib-samples", type=int, default=256, show_default=True, help="Most calibration samples used.")
@click.option("--prune", "prune_spec", help="Structured pruning ratio, or per branch: vision=0.3,text=0.2.")
@click.option("--recover", type=int, default=0, help="Distillation steps after pruning (on --calib, no labels).")
@click.option("--recover-lr", type=FINITE_FLOAT, default=1e-3, show_default=True,
              help="Recovery learning rate (1e-4 suits pretrained towers).")
@click.option("--sparsity", type=click.Choice(["2:4"]), help="2:4 weight sparsity (TensorRT sparse tensor cores).")
@click.option("--dla", is_flag=True, help="Run on a DLA core with GPU fallback (Orin NX / AGX Orin).")
@click.option("--workspace-mb", type=int, help="TensorRT workspace limit (default from the target).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--version-compatible", is_flag=True, help="TensorRT version-compatible engine.")
@click.option("--hardware-compatibility", type=click.Choice(["none", "ampere_plus", "same_cc"]), default="none",
              show_default=True, help="TensorRT hardware compatibility level.")
@click.option("--refittable", is_flag=True,
              help="TensorRT: build a refittable engine (new weights later with `edgemm build --refit NEW.onnx`).")
@click.option("--profile-batches", multiple=True, metavar="MIN:OPT:MAX",
              help="TensorRT: one optimization profile per batch range, e.g. --profile-batches 1:1:1 "
                   "--profile-batches 8:32:64 (latency and throughput); the runtime picks per call.")
@click.option("--cuda-graph", is_flag=True, help="TensorRT runtime: capture and replay CUDA graphs.")
@click.option("--split", is_flag=True,
              help="One model per modality branch plus the fusion head, run as a pipeline (cached branches).")
@click.option("--place", help="With --split on TensorRT targets: PART=DEVICE per part, e.g. vision=dla0,text=gpu.")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--no-thread-tuning", is_flag=True,
              help="Do not time 1 vs default ORT threads (CPU bundles); keep ORT's default.")
@click.option("--cpu-engines", type=click.Choice(["auto", "onnxruntime"]), default="auto", show_default=True,
              help="CPU --int8: also measure OpenVINO FP32/BF16/INT8 on this host and carry the faster ones as "
                   "variants (auto, when edgemm[openvino] is installed), or ONNX Runtime only.")
@click.option("--config", "config_file", type=click.Path(),
              help="Load the whole config from a JSON file (trust only from --trust-pickle beside it).")
@click.option("--dump-config", is_flag=True, help="Print the config as JSON and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@verbose_option
def command(model, output, name, precision, precision_spec, branch, accuracy_target, calib, eval_, target, weights, trust_pickle, inputs, dynamic,
            output_names, static_batch, max_batch, exporter, int8_recipe, exclude, min_cosine, min_top1, max_metric_drop, calib_samples, prune_spec, recover, recover_lr, sparsity, dla, workspace_mb,
            opt_level, version_compatible, hardware_compatibility, refittable, profile_batches, cuda_graph, split, place, force, no_thread_tuning, cpu_engines, config_file, dump_config,
            as_json):
    """Compile MODEL (.pt TorchScript, .pt2 torch.export, .onnx, or package.module:function)."""
    from ..errors import InputError

    if config_file:
        _no_flags_besides_config()
        cfg = CompileConfig.from_file(Path(config_file))
        cfg.trust_pickle = trust_pickle  # only ever from the command line
    else:
        if not model:
            raise InputError("missing MODEL argument", field="MODEL",
                             fix="edgemm compile model.pt --int8 --calib calib.npz")
        policy = None
        if precision_spec and "=" in precision_spec:
            policy = precision_spec
        elif precision_spec:
            if precision and precision != precision_spec:
                raise InputError(f"--precision {precision_spec} conflicts with --{precision}", field="--precision",
                                 fix="give the precision once")
            precision = precision_spec
        cfg = CompileConfig(model=model, output=output, name=name, precision=precision or "fp32", target=target,
                            precision_policy=policy, branch=list(branch), accuracy_target=accuracy_target,
                            calib=calib, eval=eval_, weights=weights, trust_pickle=trust_pickle,
                            inputs=list(inputs), dynamic=list(dynamic), output_names=output_names, dynamic_batch=not static_batch,
                            max_batch=max_batch, exporter=exporter, int8_recipe=int8_recipe, exclude=list(exclude),
                            min_cosine=min_cosine, min_top1=min_top1, max_metric_drop=max_metric_drop,
                            calib_samples=calib_samples, dla=dla,
                            prune=prune_spec, recover=recover, recover_lr=recover_lr, sparsity=sparsity,
                            workspace_mb=workspace_mb, opt_level=opt_level,
                            version_compatible=version_compatible,
                            hardware_compatibility=hardware_compatibility, refittable=refittable,
                            profile_batches=list(profile_batches), cuda_graph=cuda_graph, split=split, place=place, force=force,
                            tune_threads=not no_thread_tuning, cpu_engines=cpu_engines)
    cfg.validate()
    if dump_config:
        click.echo(json.dumps(cfg.to_file_dict(), indent=2))
        return 0
    from ..pipeline import compile_model

    # Progress goes to stdout: stderr carries only the one-line error, if any.
    say = (lambda m: None) if as_json else (lambda m: click.echo(f"  {m}"))
    result = compile_model(cfg, say=say)
    if as_json:
        click.echo(json.dumps({"bundle": str(result.bundle), "manifest": result.manifest.to_dict(),
                               "report": result.report}, indent=2))
    else:
        _print_summary(result)
    return 0


def _print_summary(result) -> None:
    m = result.manifest
    click.echo(f"bundle: {result.bundle}")
    click.echo(f"  precision {m.precision.label} ({m.precision.recipe.get('name') or m.precision.recipe.get('tool')}) · "
               f"backend {m.backend.name} · target {m.target.name}")
    r = result.report or {}
    if r.get("skipped"):
        click.echo(f"  parity: {r['skipped']}")
    if r.get("simulated"):  # the figures below are not the device's
        click.echo(f"  simulated: {r['simulated']}")
    indent = "  "
    if r.get("vs_original"):  # pruned: the figures that matter are against the model the user brought
        from ..parity.verify import vs_original_lines

        for line in vs_original_lines(r["vs_original"]):
            click.echo(f"  {line}")
        click.echo("  bundle vs the pruned model (what precision changed):")
        indent = "    "
    from ..parity.metrics import cosine_text, top1_text

    for name, o in r.get("outputs", {}).items():
        extra = (f", top-1 agreement {top1_text(o)}" if "top1_agreement" in o else
                 f", {top1_text(o)}" if "top1_decisive" in o else "")
        cos = cosine_text(o) if "mean_cosine" in o else f"exact {o.get('exact_match')}"
        click.echo(f"{indent}{name}: {cos}{extra}")
    if "task" in r:
        t = r["task"]
        click.echo(f"  task {t['metric']}: reference {t.get('reference', float('nan')):.2f}, "
                   f"bundle {t.get('bundle', float('nan')):.2f}")
    for note in m.precision.notes:
        click.echo(f"  note: {note}")


def _no_flags_besides_config() -> None:
    """--config is the whole request: a flag given beside it would be silently dropped, so refuse it."""
    from click.core import ParameterSource

    from ..errors import InputError

    ctx = click.get_current_context()
    allowed = {"config_file", "dump_config", "as_json", "verbose", "trust_pickle"}  # trust: never from the file
    for param in ctx.command.params:
        if param.name in allowed or ctx.get_parameter_source(param.name) in (None, ParameterSource.DEFAULT):
            continue
        flag = param.opts[0] if param.opts and param.opts[0].startswith("-") else param.name.upper()
        raise InputError("given with --config, which carries the whole config", field=flag,
                         fix="put it in the JSON file (edgemm compile ... --dump-config writes one), or drop --config")

