"""The web demo: generate, caption, illustrate, interpolate and browse a run in a browser (Gradio).

    pip install -e '.[demo]'
    python -m jobs.demo                                   # http://127.0.0.1:7860, the embedded checkpoint
    python -m jobs.demo --run outputs/run1 --port 8080    # Browse opens that jobs.generate output

It binds to 127.0.0.1 (this machine only) unless --host says otherwise, and makes no public link
unless --share. Every tab is also an API endpoint (/generate, /caption, /illustrate, /interpolate,
/browse) for `gradio_client` and scripts; the UI is in jobs/demo_app.py, and the samples are
jobs.sample's (the same flags, the same bytes for the same seed).
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from jobs.cli import argv_or_sys, parse
from jobs.sample import SampleError, Sampler, SampleSettings


@dataclass
class DemoConfig:
    """The demo's flags: where it listens, what Browse opens, and jobs.sample's sampling settings."""

    settings: Annotated[SampleSettings, tyro.conf.arg(name="")] = field(default_factory=SampleSettings)
    # Address to bind: 127.0.0.1 = this machine only; 0.0.0.0 = every interface (anyone who reaches it).
    host: str = "127.0.0.1"
    # Port to serve on.
    port: int = 7860
    # Also make a public *.gradio.live link through Gradio's share servers (off: nothing leaves this machine).
    share: bool = False
    # The generation output the Browse tab opens first (a jobs.generate --output folder).
    run: str = "outputs/demo/generate"
    # Samples per page in the Browse tab.
    page_size: int = 24

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise SampleError(f"--port must be in 1..65535, got {self.port}")
        if not 1 <= self.page_size <= 500:
            raise SampleError(f"--page-size must be in 1..500, got {self.page_size}")


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    return parse(DemoConfig, argv_or_sys(argv), DemoConfig(), __doc__.split("\n")[0])


def main(cfg: DemoConfig) -> None:
    """Load the checkpoint, build the app, serve until interrupted."""
    cfg.validate()
    try:
        from jobs.demo_app import build_app
    except ImportError as e:  # gradio or duckdb missing
        raise SampleError(f"the demo needs its extra: pip install -e '.[demo]' ({e})") from e
    app, cache = build_app(Sampler(cfg.settings), cfg.run, cfg.page_size)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as Ctrl-C does: Gradio closes
    try:
        app.queue().launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True)
    except KeyboardInterrupt:  # stopped while Gradio was still starting (after that, Gradio handles it)
        app.close()
    finally:
        cache.close()


if __name__ == "__main__":
    config = parse_args()
    try:
        main(config)
    except SampleError as e:
        sys.exit(f"error: {e}")
