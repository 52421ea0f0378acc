"""The ``lensbench`` command: ``info``, ``report``, ``lens``."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="lensbench: look inside language models.")


def _load(model: str | None, device: str | None, dtype: str | None):
    import lensbench as lb
    try:
        return lb.load(model, device=device, dtype=dtype)
    except lb.LensbenchError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


@app.command()
def info(model: str = typer.Option(None, help="hub id or local dir; default: embedded SmolLM2-135M"),
         device: str = typer.Option(None), dtype: str = typer.Option(None)):
    """Print the model's anatomy and its load-time validation."""
    m = _load(model, device, dtype)
    typer.echo(repr(m))
    typer.echo(str(m.anatomy))


@app.command()
def report(model: str = typer.Option(None, help="hub id or local dir; default: embedded SmolLM2-135M"),
           out: Path = typer.Option(Path("out/report.html"), help="HTML file to write"),
           quick: bool = typer.Option(False, help="a minute-scale run on a few short texts"),
           device: str = typer.Option(None), dtype: str = typer.Option(None)):
    """Run every probe on the model and the shipped texts; write one offline HTML report."""
    from .report import write_report
    m = _load(model, device, dtype)
    path = write_report(m, out, quick=quick)
    typer.echo(f"wrote {path}")


@app.command()
def lens(text: str = typer.Option(..., help="text to analyse"),
         model: str = typer.Option(None), out: Path = typer.Option(Path("lens.html")),
         stat: str = typer.Option("top1_prob", help="colour: top1_prob, entropy, kl_to_final, ce_next, ..."),
         target: str = typer.Option(None, help="token to track, e.g. ' Paris'"),
         device: str = typer.Option(None), dtype: str = typer.Option(None)):
    """Logit lens of one text as an offline HTML figure."""
    import lensbench as lb
    m = _load(model, device, dtype)
    try:
        res = lb.logit_lens(m, text, target=target)
        fig = res.figure(stat)
    except lb.LensbenchError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(out), include_plotlyjs=True)
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
