"""`holiclip demo`: the side-by-side run behind `make demo`."""
from __future__ import annotations

import shlex
from typing import Optional

import typer

from ._options import comma_list


def app(
    quick: bool = typer.Option(False, "--quick", help="Tiny data, a few steps (a smoke test, under a minute)."),
    full: bool = typer.Option(False, "--full", help="Three seeds; the report gives mean and spread."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Comma-separated subset, e.g. clip,o2m."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default runs/demo or runs/demo-quick)."),
    data: Optional[str] = typer.Option(None, "--data", help="Emoji dataset folder (built if missing)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the number of training steps."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Override the number of seeds."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Runs side by side (default: 2 on 2+ cores)."),
    ablations: bool = typer.Option(False, "--ablations", help="The paper's ablations (fusion, branch subsets, number "
                                   "of texts, Psi_MLP, regulariser, control, two styles, dense probe), 3 seeds (2 for "
                                   "the text-count, regulariser, control and two-style runs); "
                                   "default --out runs/ablations, reusing finished runs there and in --reuse."),
    reuse: Optional[str] = typer.Option(None, "--reuse", help="With --ablations: comma-separated folders of "
                                        "finished runs to reuse (default runs/demo)."),
    records_only: bool = typer.Option(False, "--records-only", help="With --ablations: train nothing; report the "
                                      "runs recorded (in --out's records/ and docs/reproduction/runs) and list the "
                                      "missing ones."),
    publish: bool = typer.Option(False, "--publish", help="With --ablations, in a checkout: also write the full "
                                 "report to docs/reproduction.md (its figures and run records beside it) and the "
                                 "README's summary. Without it nothing is written into the checkout."),
) -> None:
    """CLIP vs O2M vs Holistic CLIP on the built-in emoji benchmark: trains, evaluates, reports."""
    from holiclip.benchmarks.emoji.data.sources import MissingSourcesError
    from holiclip.benchmarks.emoji.demo import run_demo

    if quick and full:
        raise typer.BadParameter("--quick and --full exclude each other")
    if ablations and (full or data or steps):
        raise typer.BadParameter("--ablations has its own data, steps and seeds (3): drop --full, --data, --steps")
    if (reuse or records_only or publish) and not ablations:
        raise typer.BadParameter("--reuse, --records-only and --publish go with --ablations")
    mode = "quick" if quick else "full" if full else "default"
    names = comma_list(variants)
    # the report names the command that produced it: these options, as given
    given = {"--quick": quick, "--full": full, "--variants": variants, "--out": out, "--data": data,
             "--steps": steps, "--seeds": seeds, "--jobs": jobs, "--ablations": ablations, "--reuse": reuse,
             "--records-only": records_only, "--publish": publish}
    args = [a for k, v in given.items() if v is not None and v is not False for a in ((k,) if v is True else (k, str(v)))]
    try:
        if ablations:
            from holiclip.benchmarks.emoji.ablations import run_ablations

            run_ablations(quick, out, seeds, jobs, comma_list(reuse), names, command=shlex.join(["holiclip", "demo", *args]),
                          records_only=records_only, publish=publish)
            return
        run_demo(mode, names, out or ("runs/demo-quick" if quick else "runs/demo"), data, steps, seeds, jobs,
                 command=shlex.join(["holiclip", "demo", *args]))
    except (MissingSourcesError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
