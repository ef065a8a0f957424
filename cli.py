"""covedit command line: parses, calls the pipeline, prints, maps errors to exit codes.

``python cli.py ...`` (from a checkout) and the installed ``covedit ...`` are the same typer app.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

# ``python cli.py`` runs this file as a script, not as covedit.cli. The repository root is the package
# ``covedit`` (pyproject.toml's package-dir installs it under that name), so register this checkout's root
# as ``covedit`` for the imports below: it works without an install and never mixes in another copy.
if not __package__ and "covedit" not in sys.modules:
    import importlib.util

    _root = Path(__file__).resolve().parent
    _spec = importlib.util.spec_from_file_location("covedit", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    sys.modules["covedit"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["covedit"])

import typer  # noqa: E402

from covedit.pipeline.errors import EXIT_CODES, CoveditError, UsageError  # noqa: E402

log = logging.getLogger("covedit.cli")  # not __name__: that is "__main__" under ``python cli.py``

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Edit facts inside language models with covariance-normalised updates (ROME, MEMIT, AlphaEdit).\n\n"
                       "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
stats_app = typer.Typer(no_args_is_help=True, help="Inspect, export and import statistics stores.")
app.add_typer(stats_app, name="stats")


def user_errors(fn):
    """Turn a CoveditError into one line on stderr and its exit code; other errors keep their traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CoveditError as e:
            typer.echo(f"covedit: error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
    return wrapper


def parse_layers(text: str | None) -> list[int] | None:
    """'3,4,5', '3-7' or '2,4-6' -> sorted unique layer numbers."""
    if text is None or text == "":
        return None
    layers: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"--layers: cannot read {part!r}; use e.g. 3,4,5 or 3-7.")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise UsageError(f"--layers: range {part!r} runs backwards.")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def parse_checkpoint_every(text: str) -> tuple[int | None, float | None]:
    """'200000' (tokens), '10m' / '300s' / '1h' (time)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise UsageError(f"--checkpoint-every: cannot read {text!r}; use a token count (200000) or a time (300s, 10m).")
    value, unit = float(m[1]), m[2]
    if value <= 0:
        raise UsageError("--checkpoint-every must be positive.")
    if not unit:
        return int(value), None
    return None, value * {"s": 1, "m": 60, "h": 3600}[unit]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise UsageError(f"--shard must be I/N with 0 <= I < N, got {text!r}.")
    return int(m[1]), int(m[2])


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("distributed", "transformers", "urllib3", "httpx", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers  # noqa: PLC0415

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


Model = Annotated[str, typer.Option(help="Embedded 'smollm2-135m' (default) or 'gemma3-270m', a local folder, or a Hugging Face id.")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
Template = Annotated[Optional[str], typer.Option(help="Down-projection path with {} for the layer, for architectures the registry does not know.")]
FactsFormat = Annotated[str, typer.Option("--format", help="Facts file format: auto, covedit, counterfact or zsre.")]
StatsDir = Annotated[Optional[Path], typer.Option(help="Where statistics stores live (default: $COVEDIT_STATS_DIR or ~/.cache/covedit/stats).")]


@app.command("build-stats")
@user_errors
def build_stats_cmd(
    model: Model = "smollm2-135m",
    layers: Annotated[Optional[str], typer.Option(help="Layers to collect, e.g. 4,5,6 or 4-8 (default: the layers batch-edit uses).")] = None,
    corpus: Annotated[str, typer.Option(help="'wiki-embedded' (default), a Hugging Face dataset name, or local parquet/jsonl/txt files or folders.")] = "wiki-embedded",
    corpus_config: Annotated[Optional[str], typer.Option(help="Dataset config, e.g. 20231101.en.")] = None,
    corpus_split: Annotated[str, typer.Option(help="Dataset split.")] = "train",
    corpus_revision: Annotated[Optional[str], typer.Option(help="Dataset revision (pin it for reproducible statistics).")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text in jsonl/parquet/datasets.")] = "text",
    seed: Annotated[int, typer.Option(help="Seed of the document order.")] = 0,
    tokens: Annotated[Optional[int], typer.Option(help="Token budget (real, non-padding tokens); default: the whole corpus.")] = None,
    max_length: Annotated[int, typer.Option(help="Tokens per sequence; longer documents are split.")] = 1024,
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward pass (bounds memory).")] = 8192,
    bos: Annotated[str, typer.Option(help="'skip' leaves the BOS position out of the sums, 'keep' counts it.")] = "skip",
    accumulate: Annotated[str, typer.Option(help="mixed (default: float32 products per batch, float64 running sums), float64 or float32.")] = "mixed",
    dtype: Dtype = "float32",
    device: Device = "cpu",
    module_template: Template = None,
    stats_dir: StatsDir = None,
    checkpoint_every: Annotated[str, typer.Option(help="Checkpoint every N tokens (200000) or every T (300s, 10m).")] = "200000",
    window_docs: Annotated[int, typer.Option(help="Documents sorted by length together (less padding); resume points fall between windows.")] = 512,
    workers: Annotated[int, typer.Option(help="Parallel workers (a dask LocalCluster when > 1).")] = 1,
    threads: Annotated[Optional[int], typer.Option(help="torch threads per worker (default: cores / workers). Results are bitwise reproducible for a fixed thread count.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Join an existing dask cluster at this address instead.")] = None,
    shard: Annotated[Optional[str], typer.Option(help="Compute only shard I of N (I/N) and exit; see --reduce.")] = None,
    reduce: Annotated[bool, typer.Option("--reduce", help="Add up finished shards and mark the store complete.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or info logs.")] = False,
):
    """Stream text through the model once and store Σ k kᵀ and the token count for every requested layer."""
    setup_logging(quiet or as_json)
    from covedit.pipeline.models import count_layers, default_layers  # noqa: PLC0415 (slow imports after parsing)
    from covedit.pipeline.tokens import check_bos_policy  # noqa: PLC0415
    from covedit.stats.corpus import CorpusSpec  # noqa: PLC0415
    from covedit.stats.distributed import StatsJob, build_stats  # noqa: PLC0415
    from covedit.stats.store import ACCUMULATE, default_stats_dir  # noqa: PLC0415

    if tokens is not None and tokens <= 0:
        raise UsageError("--tokens must be a positive number of tokens.")
    if max_length <= 1:
        raise UsageError("--max-length must be at least 2.")
    check_bos_policy(bos, "--bos")
    if accumulate not in ACCUMULATE:
        raise UsageError("--accumulate must be mixed, float64 or float32.")
    if window_docs < 1:
        raise UsageError("--window-docs must be at least 1.")
    if workers < 1:
        raise UsageError("--workers must be at least 1.")
    ck_tokens, ck_seconds = parse_checkpoint_every(checkpoint_every)
    layer_list = parse_layers(layers)
    if layer_list is None:
        layer_list = default_layers(count_layers(model))
    job = StatsJob(model=model, layers=tuple(layer_list),
                   corpus=CorpusSpec(corpus, corpus_config, corpus_split, text_field, corpus_revision, seed),
                   tokens=tokens, max_length=max_length, batch_tokens=batch_tokens, bos=bos, accumulate=accumulate,
                   dtype=dtype, device=device, module_template=module_template,
                   checkpoint_tokens=ck_tokens, checkpoint_seconds=ck_seconds, window_docs=window_docs, threads=threads,
                   stats_dir=str(stats_dir or default_stats_dir()))
    result = build_stats(job, workers=workers, scheduler=scheduler, shard=parse_shard(shard), reduce_only=reduce,
                         show_progress=not quiet)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    said = {"cached": "already complete, nothing to do", "built": "built", "resumed": "resumed and completed",
            "shard-done": "shard finished (run --reduce once all shards are done)", "reduced": "shards added up"}
    typer.echo(f"statistics {said[result.status]}: layers {','.join(map(str, result.layers))}, "
               f"{result.tokens:,} tokens{' (corpus ran out before the budget)' if result.exhausted else ''}, "
               f"{result.wall_seconds:.1f} s" + (f", {result.tokens_per_second:,.0f} tokens/s" if result.tokens_per_second else ""))
    typer.echo(f"store: {result.path}")


@stats_app.command("info")
@user_errors
def stats_info(stats_dir: StatsDir = None, as_json: Annotated[bool, typer.Option("--json")] = False):
    """List statistics stores with their keys and sizes."""
    from covedit.stats.store import default_stats_dir, list_stores  # noqa: PLC0415

    stores = list_stores(stats_dir or default_stats_dir())
    if as_json:
        typer.echo(json.dumps(stores, indent=2, default=str))
        return
    if not stores:
        typer.echo(f"no statistics stores in {stats_dir or default_stats_dir()}")
    for s in stores:
        key = s.get("key", {})
        state = "complete" if s.get("complete") else "partial"
        typer.echo(f"{s['path']}\n  {state}, layers {key.get('layers')}, {s.get('tokens') or 0:,} tokens, "
                   f"{s.get('size_bytes', 0) / 2**20:.1f} MiB\n  model {key.get('model_id')}, corpus "
                   f"{json.dumps(key.get('corpus'), default=str)[:120]}, max_length {key.get('max_length')}, "
                   f"accumulate {key.get('accumulate')}")


@stats_app.command("export")
@user_errors
def stats_export(store: Annotated[Path, typer.Argument(help="A complete store (.zarr folder).")],
                 out_dir: Annotated[Path, typer.Option(help="Folder for the .npz files.")] = Path("."),
                 fmt: Annotated[str, typer.Option("--format", help="Only rome-npz for now.")] = "rome-npz",
                 layer: Annotated[Optional[str], typer.Option(help="Layers to export (default all).")] = None):
    """Write one ROME/MEMIT-layout .npz per layer (mom2.mom2 = raw sum, mom2.count)."""
    from covedit.stats.interop import export_npz  # noqa: PLC0415
    from covedit.stats.store import StatsStore  # noqa: PLC0415

    if fmt != "rome-npz":
        raise UsageError("--format: only rome-npz is supported.")
    st = StatsStore.open(store)
    out_dir.mkdir(parents=True, exist_ok=True)
    for L in parse_layers(layer) or st.layers:
        path = out_dir / f"layer_{L}_mom2_{st.key_hash}.npz"
        export_npz(st, L, path)
        typer.echo(str(path))


@stats_app.command("import")
@user_errors
def stats_import(npz: Annotated[Path, typer.Argument(help="A ROME/MEMIT/EasyEdit/AlphaEdit stats .npz file.")],
                 layer: Annotated[int, typer.Option(help="The layer the file holds.")],
                 model: Model = "smollm2-135m",
                 dtype: Dtype = "float32",
                 module_template: Template = None,
                 corpus_name: Annotated[str, typer.Option(help="What the file was computed on (recorded in the key).")] = "imported",
                 stats_dir: StatsDir = None):
    """Turn a ROME-layout .npz into a complete covedit store the edit stage can use."""
    from covedit.pipeline.models import describe_model  # noqa: PLC0415
    from covedit.stats.interop import import_npz  # noqa: PLC0415
    from covedit.stats.store import canonical_key, default_stats_dir  # noqa: PLC0415

    if not npz.exists():
        from covedit.pipeline.errors import MissingInput  # noqa: PLC0415
        raise MissingInput(f"No such file: {npz}.")
    skeleton = describe_model(model, module_template=module_template)  # no weights loaded
    skeleton.check_layers([layer])
    key = canonical_key(model_id=skeleton.model_id, dtype=dtype, module=skeleton.arch.template(), layers=[layer],
                        corpus={"kind": "imported", "name": corpus_name, "file": npz.name}, tokens=None,
                        max_length=None, bos=None, accumulate="float32", seed=None)
    st = import_npz(npz, stats_dir or default_stats_dir(), key, layer, expected_dim=skeleton.d_ff)
    typer.echo(f"imported layer {layer} into {st.path}")


def _evaluation_brief(ev: dict | None) -> dict | None:
    """The evaluation without its per-fact, per-prompt and generated-text detail (manifest.json has it)."""
    if not ev:
        return None
    drift = {k: v for k, v in (ev.get("drift") or {}).items() if k != "per_prompt"}
    fluency = {w: {k: v for k, v in f.items() if k != "generations"} for w, f in (ev.get("fluency") or {}).items() if f}
    return {"before": ev["before"], "after": ev["after"], "drift": drift, "fluency": fluency}


def stats_builder(cfg_device: str, module_template: str | None, stats_tokens: int | None):
    """What ``batch-edit --build-stats`` hands the edit stage: build the statistics it lacks (embedded corpus,
    ``stats_tokens`` tokens) when it asks; the edit stage itself only reads statistics."""

    def build_missing(need) -> None:
        from covedit.stats.corpus import CorpusSpec  # noqa: PLC0415
        from covedit.stats.distributed import StatsJob, build_stats  # noqa: PLC0415

        log.info("no statistics for layers %s yet: building them (--build-stats)", need.layers)
        build_stats(StatsJob(model=need.model, layers=tuple(need.layers), corpus=CorpusSpec(), tokens=stats_tokens,
                             dtype="float32", device=cfg_device, module_template=module_template,
                             stats_dir=str(need.stats_dir)), show_progress=True)

    return build_missing


@app.command("batch-edit")
@user_errors
def batch_edit_cmd(
    facts: Annotated[Path, typer.Argument(help="Facts JSONL (our schema, CounterFact or zsRE records).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the edited model, delta.safetensors and manifest.json.")] = Path("edited"),
    method: Annotated[str, typer.Option(help="memit (default), rome or alphaedit.")] = "memit",
    covariance: Annotated[Optional[str], typer.Option(help="C (statistics, default) or identity: C = I, which with --method rome is the plain rank-one update (v − Wk)kᵀ/kᵀk and with memit the ridge λI + KKᵀ.")] = None,
    fmt: FactsFormat = "auto",
    model: Model = "smollm2-135m",
    dtype: Dtype = "float32",
    device: Device = "cpu",
    module_template: Template = None,
    hparams: Annotated[Optional[str], typer.Option(help="JSON/YAML file of hyperparameters.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override one hyperparameter, e.g. --set lam=1500 --set target.lr=0.1.")] = None,
    stats_dir: StatsDir = None,
    stats: Annotated[Optional[Path], typer.Option(help="Use this statistics store.")] = None,
    build_stats: Annotated[bool, typer.Option("--build-stats", help="Build missing statistics first (embedded corpus).")] = False,
    stats_tokens: Annotated[Optional[int], typer.Option(help="Token budget for --build-stats.")] = None,
    device_map: Annotated[Optional[str], typer.Option(help="Spread the model over the visible GPUs: auto, balanced or sequential (accelerate); each layer's update is computed on its own device. Replaces --device.")] = None,
    base: Annotated[Optional[Path], typer.Option(help="Continue from an earlier batch-edit output (sequential edits).")] = None,
    keep: Annotated[Optional[Path], typer.Option(help="Facts file of facts the edit must leave alone (e.g. probe --write-known): their keys are kept with the earlier batches' (memit, alphaedit), in this batch and the later ones.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the before/after evaluation (then nothing checks that the edited model still works).")] = False,
    no_generation: Annotated[bool, typer.Option("--no-generation", help="Evaluate teacher-forced only: skip the generation family (greedy answers, chat), the slowest part of the evaluation.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write the edited model even if the evaluation finds it broken (mean KL on unrelated prompts > 1 nat, > 50 % of their top-1 tokens changed, or fluency down > 20 %); without it such an edit exits 65 and writes nothing.")] = False,
    max_drift: Annotated[Optional[float], typer.Option(help="Refuse (exit 65, nothing written) a batch whose model is further than this from the original model of the sequence: mean KL on the unrelated prompts, nats.")] = None,
    max_norm_growth: Annotated[Optional[float], typer.Option(help="Refuse (exit 65, nothing written) a batch after which an edited weight's Frobenius norm exceeds this multiple of the original model's, e.g. 1.05.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write a report (json, markdown, plots) of the before/after evaluation here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
):
    """Apply MEMIT / ROME / AlphaEdit edits of many facts at once and write a revertible edited model."""
    setup_logging(quiet or as_json)
    from covedit.pipeline.batch_edit import BatchEditConfig, run_batch_edit  # noqa: PLC0415
    from covedit.pipeline.models import cache_root  # noqa: PLC0415
    from covedit.pipeline.report import check_report_dir, quick_look, report_from_summary, write_report  # noqa: PLC0415

    if method not in ("memit", "rome", "alphaedit"):
        raise UsageError("--method must be memit, rome or alphaedit.")
    if covariance not in (None, "C", "identity"):
        raise UsageError("--covariance must be C or identity.")
    if device_map is not None and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise UsageError("--device-map must be auto, balanced, balanced_low_0 or sequential.")
    if report is not None:
        if no_eval:
            raise UsageError("--report needs the before/after evaluation: drop --no-eval.")
        check_report_dir(report)
    if max_drift is not None and (max_drift < 0 or no_eval):
        raise UsageError("--max-drift must be a KL in nats >= 0, and needs the evaluation (no --no-eval).")
    if max_norm_growth is not None and max_norm_growth <= 0:
        raise UsageError("--max-norm-growth must be a positive ratio, e.g. 1.05.")
    result = run_batch_edit(BatchEditConfig(
        facts=facts, output=output, method=method, covariance=covariance, fmt=fmt, model=model, dtype=dtype,
        device=device, device_map=device_map, module_template=module_template, hparams_file=hparams,
        overrides=list(set_ or []), stats_dir=stats_dir, stats=stats, base=base, keep=keep,
        overwrite=overwrite, evaluate=not no_eval, generation=not no_generation, force=force, max_drift=max_drift,
        max_norm_growth=max_norm_growth,
        reference_cache=cache_root() / "eval",
        build_missing_stats=stats_builder(device, module_template, stats_tokens) if build_stats else None))
    if report is not None:
        write_report(report, report_from_summary(result.manifest))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.manifest.items() if k != "evaluation"} |
                              {"evaluation": _evaluation_brief(result.evaluation)},
                              indent=2, default=str))
        return
    t = result.timings
    typer.echo(f"edited {result.n_facts} facts with {method} at layers {result.layers} in {t.edit_s:.1f} s "
               f"({result.seconds_per_fact:.2f} s per fact; targets {t.targets_s:.1f} s, solve {t.solve_s:.1f} s)")
    typer.echo(quick_look(result.evaluation))
    if no_eval:
        typer.echo("\nnot evaluated (--no-eval): nothing checked that the edited model still works")
    elif result.forced:
        typer.echo(f"\nWARNING: written with --force although broken: {'; '.join(result.broken)}")
    typer.echo(_sequence_line(result.manifest.get("history")))
    typer.echo(f"\nwrote {output}/ (model, delta.safetensors, manifest.json)")
    if report is not None:
        typer.echo(f"wrote {report}/ (report.md, report.json, plots)")


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    model: Model = "smollm2-135m",
    facts: Annotated[Optional[Path], typer.Option(help="Facts JSONL to score (our schema, CounterFact or zsRE); without it only drift and fluency.")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="A second model (e.g. the unedited one) evaluated side by side, with the drift between them.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write report.json, report.md and plots into this folder.")] = None,
    fmt: FactsFormat = "auto",
    dtype: Dtype = "float32",
    device: Device = "cpu",
    module_template: Template = None,
    fluency_tokens: Annotated[int, typer.Option(help="New tokens per fluency generation.")] = 50,
    no_fluency: Annotated[bool, typer.Option("--no-fluency", help="Skip the generations for fluency.")] = False,
    no_generation: Annotated[bool, typer.Option("--no-generation", help="Skip the generation family (greedy continuations of each fact's prompts, and its chat reply).")] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole evaluation as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
):
    """Score a model on facts (success, token accuracy and generation; ripple prompts where facts have them), drift on unrelated prompts and fluency; optionally against a base model."""
    setup_logging(quiet or as_json)
    from covedit.pipeline.errors import MissingInput  # noqa: PLC0415
    from covedit.pipeline.evaluate import evaluate_model  # noqa: PLC0415
    from covedit.pipeline.facts import read_facts  # noqa: PLC0415
    from covedit.pipeline.models import load_model  # noqa: PLC0415
    from covedit.pipeline.report import build_report, check_report_dir, render_text, write_report  # noqa: PLC0415

    if batch_size < 1 or fluency_tokens < 1:
        raise UsageError("--batch-size and --fluency-tokens must be at least 1.")
    if facts is not None and not facts.is_file():
        raise MissingInput(f"Facts file {facts} does not exist.")
    if report is not None:
        check_report_dir(report)
    loaded = load_model(model, dtype, device, module_template)
    fact_list = read_facts(facts, fmt, loaded.tokenizer) if facts is not None else []
    opts = dict(batch_size=batch_size, with_fluency=not no_fluency, max_new_tokens=fluency_tokens,
                generation=not no_generation)
    after = evaluate_model(loaded, fact_list, **opts)
    before = None
    if base_model is not None:
        del loaded  # one model in memory at a time
        before = evaluate_model(load_model(base_model, dtype, device, module_template), fact_list, **opts)
    data = build_report(after, before, title=f"covedit evaluate: {model}" + (f" against {base_model}" if base_model else ""),
                        labels=("base", "model"),
                        meta={"facts_file": str(facts) if facts else None, "n_facts": len(fact_list)})
    if report is not None:
        write_report(report, data)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    typer.echo(render_text(data))
    if report is not None:
        typer.echo(f"\nwrote {report}/ (report.md, report.json, plots)")


def _facts_file_to_write(path: Optional[Path], option: str, probed: Path, what: str) -> Optional[Path]:
    """``path`` (user-expanded) once it is clear a facts file can be written there, else the error to exit with."""
    if path is None:
        return None
    from covedit.pipeline.errors import CannotWrite  # noqa: PLC0415
    path = path.expanduser()
    if path.resolve() == probed.resolve():
        raise UsageError(f"{option} {path} is the facts file being probed: write {what} to another file.")
    if not path.parent.is_dir():
        raise CannotWrite(f"Cannot write the facts file to {path}: the folder {path.parent} does not exist.")
    if path.is_dir():
        raise CannotWrite(f"Cannot write the facts file to {path}: it is a folder.")
    return path


@app.command("probe")
@user_errors
def probe_cmd(
    facts: Annotated[Path, typer.Argument(help="Facts JSONL (our schema, CounterFact or zsRE records).")],
    model: Model = "smollm2-135m",
    fmt: FactsFormat = "auto",
    dtype: Dtype = "float32",
    device: Device = "cpu",
    module_template: Template = None,
    tokens: Annotated[int, typer.Option(help="Greedy tokens to show after each rewrite prompt.")] = 5,
    wrong_only: Annotated[bool, typer.Option("--wrong-only", help="List only the facts with a known true answer "
                                             "(target_true, or a zsRE record's answer) that the model gets wrong.")] = False,
    write: Annotated[Optional[Path], typer.Option(
        "--write", help="Write the facts the model gets wrong as a facts file for batch-edit: target_new = the true "
                        "answer, target_true = what the model says now.")] = None,
    write_known: Annotated[Optional[Path], typer.Option(
        "--write-known", help="Write the facts the model already gets right (target_new = that answer) as a facts "
                              "file for batch-edit --keep.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per fact.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
):
    """What the model says now for each fact: its continuation, P(true), P(new), and whether it already knows the answer."""
    setup_logging(quiet or as_json)
    from covedit.pipeline.correct import classify, known_fact, write_facts, zsre_lines  # noqa: PLC0415
    from covedit.pipeline.evaluate import probe  # noqa: PLC0415
    from covedit.pipeline.facts import read_facts  # noqa: PLC0415
    from covedit.pipeline.models import load_model  # noqa: PLC0415

    if tokens < 1:
        raise UsageError("--tokens must be at least 1.")
    if not facts.is_file():
        from covedit.pipeline.errors import MissingInput  # noqa: PLC0415
        raise MissingInput(f"Facts file {facts} does not exist.")
    write = _facts_file_to_write(write, "--write", facts, "the corrections")
    write_known = _facts_file_to_write(write_known, "--write-known", facts, "the known facts")
    if write is not None and write_known is not None and write.resolve() == write_known.resolve():
        raise UsageError(f"--write and --write-known are the same file {write}: give two files.")
    loaded = load_model(model, dtype, device, module_template)
    fact_list = read_facts(facts, fmt, loaded.tokenizer)
    rows = probe(loaded, fact_list, n_tokens=tokens)
    sorted_facts = classify(fact_list, rows, zsre_lines(facts, fmt))
    for r, truth in zip(rows, sorted_facts.truths):
        r["true_answer"] = truth
        r["wrong"] = None if truth is None else not r["knows"]
    known = [known_fact(f, r["true_answer"]) for f, r in zip(fact_list, rows) if r["wrong"] is False]
    notes = []
    if (wrong_only or write is not None or write_known is not None) and sorted_facts.unknown:
        ids = [f.id for f in sorted_facts.unknown]
        notes.append(f"{len(ids)} of {len(rows)} facts have no known true answer (no target_true, and not zsRE "
                     f"records, whose answer is the true one), so they cannot be corrected and are skipped: "
                     f"{', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}.")
    n_truth = len(rows) - len(sorted_facts.unknown)
    if wrong_only:
        rows = [r for r in rows if r["wrong"]]
        notes.append(f"the model gets {len(sorted_facts.wrong)} of the {n_truth} facts with a known true answer wrong.")
    if write is not None:
        if sorted_facts.wrong:
            write_facts(write, sorted_facts.wrong)
            n = len(sorted_facts.wrong)
            notes.append(f"wrote {n} fact{'s' if n != 1 else ''} to {write} (target_new: the true answer; target_true: "
                         f"what the model says now), ready for `covedit batch-edit {write}"
                         f"{'' if model == 'smollm2-135m' else f' --model {model}'} --output DIR`.")
        else:
            notes.append(f"the model gets none of the {n_truth} facts with a known true answer wrong: nothing to "
                         f"correct, {write} not written.")
    if write_known is not None:
        if known:
            write_facts(write_known, known)
            n = len(known)
            notes.append(f"wrote the {n} fact{'s' if n != 1 else ''} the model already knows to {write_known}, for "
                         f"`covedit batch-edit ... --keep {write_known}`.")
        else:
            notes.append(f"the model knows none of the {n_truth} facts with a known true answer: {write_known} not "
                         "written.")
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        for note in notes:
            typer.echo(note, err=True)
        return

    def pct(p):
        return "-" if p is None else f"{100 * p:.3g}%"

    typer.echo(f"{'fact':<20} {'knows':<6} {'P(true)':>8} {'P(new)':>8}  prompt -> greedy continuation")
    for r in rows:
        knows = ("yes" if r["knows"] else "no") + ("*" if r["checked"] == "target_new" else "")
        typer.echo(f"{r['id'][:20]:<20} {knows:<6} {pct(r['p_true']):>8} {pct(r['p_new']):>8}  "
                   f"{r['prompt']} -> {repr(r['continuation']) if r['continuation'] else '(end of text)'}")
    typer.echo("\nknows: the model's top-1 prediction is every token of target_true (teacher-forced).")
    if any(r["checked"] == "target_new" for r in rows):
        typer.echo("*: no target_true, so target_new was checked; for zsRE records target_new is the true answer "
                   "(the edit then asks for what the model may already know).")
    if notes:
        typer.echo("")
    for note in notes:
        typer.echo(note)


def _sequence_line(seq: dict | None) -> str:
    """One line on where this batch leaves the sequence: its number, norm growth, drift from the original."""
    if not seq:
        return ""
    growth = max(seq["norm_growth"].values()) if seq["norm_growth"] else None
    d = seq.get("drift_from_origin")
    return (f"\nbatch {seq['batch']} of the sequence (applied: {', '.join(map(str, seq['applied']))}); against the "
            f"original model: largest weight-norm growth {growth:.4f}x" +
            (f", drift mean KL {d['mean_kl']:.4f} nats, top-1 changed on {d['top1_changed_pct']:.1f} %" if d else ""))


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


@app.command("history")
@user_errors
def history_cmd(folder: Annotated[Path, typer.Argument(help="A batch-edit (or revert) output folder.")],
                as_json: Annotated[bool, typer.Option("--json", help="Print history.json (checked) as JSON.")] = False):
    """List the batches an edited model holds: facts, method, layers, update norms, norm growth and drift
    against the original model, efficacy; every file checked against its recorded sha256."""
    from covedit.pipeline.history import read_history  # noqa: PLC0415

    hist = read_history(folder)
    if as_json:
        typer.echo(json.dumps(hist.data, indent=2))
        return
    o = hist.data["origin"]
    typer.echo(f"{folder}: {len(hist.batches)} batches on {o['model']} ({o['model_id']}, {o['dtype']}); "
               f"applied: {', '.join(map(str, hist.active())) or 'none'}\n")
    typer.echo(f"{'batch':>5}  {'status':<8} {'method':<9} {'facts':>5}  {'layers':<10} {'rank':>4}  {'max |dW|':>9}  "
               f"{'norm growth':>11}  {'KL origin':>9}  {'efficacy':>8}  created")
    for r in hist.batches:
        layers = r["layers"]
        span = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1 \
            else ",".join(map(str, layers))
        ev = (r.get("evaluation") or {}).get("after") or {}
        d = r.get("drift_from_origin")
        typer.echo(f"{r['batch']:>5}  {r['status']:<8} {r['method']:<9} {r['facts']['n_facts'] or 0:>5}  {span:<10} "
                   f"{max(r['delta']['ranks'].values()):>4}  {_fmt(max(r['update_norms'].values()), '9.4g'):>9}  "
                   f"{_fmt(max(r['norm_growth'].values()), '10.5f'):>10}x  {_fmt(d and d['mean_kl'], '9.4f'):>9}  "
                   f"{_fmt(ev.get('efficacy_acc'), '7.1f'):>8}  {r['created']}")
    typer.echo("\nnorm growth: largest ||W||/||W_original|| over the batch's layers after it; KL origin: mean KL "
               "from the original model on the unrelated prompts; efficacy: top-1 accuracy on its rewrite prompts "
               "right after it, % (- : --no-eval)")


@app.command("revert")
@user_errors
def revert_cmd(folder: Annotated[Path, typer.Argument(help="A batch-edit (or revert) output folder with a history.")],
               batch: Annotated[str, typer.Option(help="The batch(es) to take off, numbered as `covedit history` lists them: 2, 1,3 or 1-3.")],
               output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the model without those batches.")],
               device: Device = "cpu",
               no_eval: Annotated[bool, typer.Option("--no-eval", help="Do not re-evaluate the facts of every batch on the result.")] = False,
               overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output.")] = False,
               as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
               quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False):
    """Take any batch of a sequence back off (W - dW_N) and write the model and its history without it."""
    setup_logging(quiet or as_json)
    from covedit.pipeline.history import parse_batches, revert_batches  # noqa: PLC0415

    res = revert_batches(folder, parse_batches(batch), output, device=device, evaluate=not no_eval, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps({"reverted": res.reverted, "later": res.later, "output": str(res.output),
                               "per_batch": res.per_batch, "drift_from_origin": res.drift_from_origin}, indent=2))
        return
    names = ", ".join(map(str, res.reverted))
    typer.echo(f"took batch {names} off {folder}")
    if res.later:
        typer.echo(f"note: batch {', '.join(map(str, res.later))} came after and was optimised on a model that held "
                   f"batch {names}; the weights are exactly the others' sum (up to rounding), but their facts may hold "
                   "less well without it" + ("." if res.evaluated else " (not re-evaluated: --no-eval)."))
    if res.evaluated:
        typer.echo(f"\n{'batch':>5}  {'status':<8} {'facts':>5}  efficacy (top-1 %) when edited -> now   "
                   "paraphrase when edited -> now")
        for row in res.per_batch:
            was, now = row["when_edited"] or {}, row["now"]
            typer.echo(f"{row['batch']:>5}  {row['status']:<8} {row['n_facts']:>5}  "
                       f"{_fmt(was.get('efficacy_acc'), '6.1f'):>6} -> {_fmt(now.get('efficacy_acc'), '6.1f'):>6}"
                       f"{'':<21}{_fmt(was.get('generalization_acc'), '6.1f'):>6} -> "
                       f"{_fmt(now.get('generalization_acc'), '6.1f'):>6}")
        d = res.drift_from_origin
        typer.echo(f"drift from the original model: mean KL {d['mean_kl']:.4f} nats, top-1 changed on "
                   f"{d['top1_changed_pct']:.1f} % of {d['n_prompts']} unrelated prompts")
    typer.echo(f"\nwrote {res.output}/ (model, delta.safetensors = this revert, manifest.json, history/)")


@app.command("export")
@user_errors
def export_cmd(folder: Annotated[Path, typer.Argument(help="A batch-edit (or revert) output folder with a history.")],
               output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the adapter.")],
               fmt: Annotated[str, typer.Option("--format", help="Only peft (a LoRA adapter on the down-projections).")] = "peft",
               batch: Annotated[Optional[str], typer.Option(help="Export only these batches (2, 1,3 or 1-3); default every applied batch.")] = None,
               max_rank: Annotated[Optional[int], typer.Option(help="Truncate each layer's update to this rank by SVD and report the relative error.")] = None,
               module_template: Template = None,
               device: Device = "cpu",
               no_eval: Annotated[bool, typer.Option("--no-eval", help="With --max-rank: do not score the facts with the truncated update.")] = False,
               overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output.")] = False,
               as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False):
    """Write the edit as a PEFT LoRA adapter for the original model (adapter_config.json + adapter_model.safetensors)."""
    setup_logging(True)
    from covedit.pipeline.export import export_peft  # noqa: PLC0415
    from covedit.pipeline.history import parse_batches  # noqa: PLC0415

    if fmt != "peft":
        raise UsageError("--format: only peft is supported.")
    res = export_peft(folder, output, parse_batches(batch) if batch else None, max_rank, overwrite, module_template,
                      evaluate=not no_eval, device=device)
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
        return
    typer.echo(f"exported batch {', '.join(map(str, res.batches))} of {folder} as a LoRA adapter of rank {res.rank} "
               f"on layers {res.layers}: {_size(res.adapter_bytes)} (the full model: {_size(res.model_bytes)})")
    if max_rank is not None:
        worst = max(res.relative_error.values())
        typer.echo(f"--max-rank {max_rank}: relative Frobenius error of dW per layer " +
                   ", ".join(f"{k}: {v:.2e}" for k, v in res.relative_error.items()) + f" (largest {worst:.2e})")
        if res.efficacy:
            full, cut = res.efficacy["full"], res.efficacy["truncated"]
            typer.echo(f"  the exported batches' {full['n_facts']} facts, full rank -> rank {max_rank}: efficacy (top-1) "
                       f"{_fmt(full['efficacy_acc'], '.1f')} -> {_fmt(cut['efficacy_acc'], '.1f')} %, paraphrase "
                       f"{_fmt(full['generalization_acc'], '.1f')} -> {_fmt(cut['generalization_acc'], '.1f')} %")
    typer.echo(f"load it on the original model with covedit.pipeline.export.load_adapter(model, '{output}') "
               "(checks the base weights, then peft; needs pip install 'covedit[serve]')")
    typer.echo(f"wrote {output}/ (adapter_config.json, adapter_model.safetensors)")


@app.command("replay")
@user_errors
def replay_cmd(folder: Annotated[Path, typer.Argument(help="A batch-edit (or revert) output folder with a history.")],
               output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the new model and its history.")],
               model: Annotated[str, typer.Option(help="The model to replay the batches on (another revision, a fine-tune, ...), as for batch-edit.")],
               dtype: Dtype = "float32",
               device: Device = "cpu",
               module_template: Template = None,
               stats_dir: StatsDir = None,
               build_stats: Annotated[bool, typer.Option("--build-stats", help="Build the new model's missing statistics first (embedded corpus).")] = False,
               stats_tokens: Annotated[Optional[int], typer.Option(help="Token budget for --build-stats.")] = None,
               no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip each batch's before/after evaluation.")] = False,
               max_drift: Annotated[Optional[float], typer.Option(help="As for batch-edit: refuse a batch this far (mean KL, nats) from the new model.")] = None,
               max_norm_growth: Annotated[Optional[float], typer.Option(help="As for batch-edit: refuse a batch that grows an edited weight's norm past this multiple.")] = None,
               overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output.")] = False,
               as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
               quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False):
    """Re-run the applied batches of a history (facts, method, hyperparameters) on another model, with its own
    statistics, and write the result with a new history."""
    setup_logging(quiet or as_json)
    from covedit.pipeline.history import read_history, replay  # noqa: PLC0415

    if max_drift is not None and (max_drift < 0 or no_eval):
        raise UsageError("--max-drift must be a KL in nats >= 0, and needs the evaluation (no --no-eval).")
    if max_norm_growth is not None and max_norm_growth <= 0:
        raise UsageError("--max-norm-growth must be a positive ratio, e.g. 1.05.")
    applied = read_history(folder).active()
    results = replay(folder, model, output, overwrite=overwrite, dtype=dtype, device=device,
                     module_template=module_template, stats_dir=stats_dir, evaluate=not no_eval, max_drift=max_drift,
                     max_norm_growth=max_norm_growth,
                     build_missing_stats=stats_builder(device, module_template, stats_tokens) if build_stats else None)
    rows = [{"batch": i, "was": n, "method": r.method, "n_facts": r.n_facts, "edit_s": r.timings.edit_s,
             "efficacy_acc": (r.evaluation or {}).get("after", {}).get("efficacy_acc")}
            for i, (n, r) in enumerate(zip(applied, results), 1)]
    if as_json:
        typer.echo(json.dumps({"output": str(output), "batches": rows}, indent=2))
        return
    for row in rows:
        typer.echo(f"batch {row['batch']} (batch {row['was']} of {folder}): {row['n_facts']} facts with {row['method']} "
                   f"in {row['edit_s']:.1f} s, efficacy (top-1) {_fmt(row['efficacy_acc'], '.1f')} %")
    typer.echo(_sequence_line(results[-1].manifest.get("history")))
    typer.echo(f"\nwrote {output}/ (model, delta.safetensors, manifest.json, history/)")


def _delta_cmd(model: str, delta_path: Path, output: Path, dtype: str, device: str, module_template: str | None,
               overwrite: bool, revert: bool) -> None:
    from covedit.pipeline.delta import (  # noqa: PLC0415
        Delta, apply_delta, layer_hashes, load_delta, revert_delta, write_edited_model)
    from covedit.pipeline.models import load_model  # noqa: PLC0415

    delta = load_delta(delta_path)
    loaded = load_model(model, dtype, device, module_template)
    if revert:
        revert_delta(loaded, delta, check_model_id=False)
        # What is written is the reverted model: record its own hashes (equal to the base's up to rounding).
        now = layer_hashes(loaded, [ld.layer for ld in delta.layers])
        flipped = Delta(delta.layers, loaded.model_id, delta.edited_hashes, now, delta.meta)
        write_edited_model(loaded, output, flipped, {"reverted": str(delta_path), "delta_meta": delta.meta},
                           overwrite=overwrite)
    else:
        delta.edited_hashes = apply_delta(loaded, delta, check_model_id=loaded.model_id == delta.base_model_id)
        write_edited_model(loaded, output, delta, {"applied": str(delta_path), "delta_meta": delta.meta},
                           overwrite=overwrite)


@app.command("apply-delta")
@user_errors
def apply_delta_cmd(delta: Annotated[Path, typer.Argument(help="delta.safetensors from batch-edit.")],
                    output: Annotated[Path, typer.Option("--output", "-o")],
                    model: Model = "smollm2-135m", dtype: Dtype = "float32", device: Device = "cpu",
                    module_template: Template = None,
                    overwrite: Annotated[bool, typer.Option("--overwrite")] = False):
    """Apply a delta to its base model (refused if the weights are not the ones it was made for)."""
    setup_logging(False)
    _delta_cmd(model, delta, output, dtype, device, module_template, overwrite, revert=False)
    typer.echo(f"applied {delta} -> {output}")


@app.command("revert-delta")
@user_errors
def revert_delta_cmd(delta: Annotated[Path, typer.Argument(help="delta.safetensors from batch-edit.")],
                     output: Annotated[Path, typer.Option("--output", "-o")],
                     model: Annotated[str, typer.Option(help="The edited model folder.")] = ".",
                     dtype: Dtype = "float32", device: Device = "cpu", module_template: Template = None,
                     overwrite: Annotated[bool, typer.Option("--overwrite")] = False):
    """Take a delta back off an edited model (refused unless the weights are exactly the edited ones)."""
    setup_logging(False)
    _delta_cmd(model, delta, output, dtype, device, module_template, overwrite, revert=True)
    typer.echo(f"reverted {delta} -> {output}")


@app.command("geometry")
@user_errors
def geometry_cmd(
    facts: Annotated[Path, typer.Argument(help="Facts JSONL (our schema, CounterFact or zsRE records).")],
    report: Annotated[Path, typer.Option(help="Folder for geometry.json and one heatmap_layer{L}.png per layer (new, empty, or an earlier geometry report).")],
    model: Annotated[str, typer.Option(help="The model to measure: embedded name, local folder (e.g. a batch-edit output) or Hugging Face id.")] = "smollm2-135m",
    base_model: Annotated[Optional[str], typer.Option(help="The unedited model: also show how the edit moved each centroid and each subject's similarity to its new and true target.")] = None,
    threshold: Annotated[float, typer.Option(help="Flag pairs of concepts whose centroid cosine is above this.")] = 0.9,
    layers: Annotated[Optional[str], typer.Option(help="Layers, e.g. 4-8,29 (default: the MEMIT edit layers and the last layer).")] = None,
    fmt: FactsFormat = "auto",
    dtype: Dtype = "float32",
    device: Device = "cpu",
    module_template: Template = None,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print geometry.json's content.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
):
    """Centroids of each subject's and target's hidden states per layer, their cosine similarities, pairs above a threshold ("semantic sinks"), and with --base-model how an edit moved them."""
    setup_logging(quiet or as_json)
    from covedit.pipeline.geometry import render_text, run_geometry  # noqa: PLC0415

    result = run_geometry(model, facts, report, base_model=base_model, threshold=threshold,
                          layers=parse_layers(layers), fmt=fmt, dtype=dtype, device=device,
                          module_template=module_template, batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(render_text(result))
    typer.echo(f"\nwrote {report}/ (geometry.json, heatmap_layer{{L}}.png for layers {','.join(map(str, result['layers']))})")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
