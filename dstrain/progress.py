"""A terminal progress bar for a core run (one bar per phase: class images, each stage)."""

from __future__ import annotations


class Bar:
    """tqdm per phase; previews are written to `preview_dir` as preview_<step>.png."""

    def __init__(self, preview_dir: str | None = None):
        self.bar = None
        self.phase = None
        self.preview_dir = preview_dir

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if p.stage != self.phase:
            self.close()
            self.phase = p.stage
            self.bar = tqdm(total=p.stage_total, desc=p.stage, unit="step", dynamic_ncols=True)
        if p.losses:
            self.bar.set_postfix_str(" ".join(f"{k} {v:.4f}" for k, v in list(p.losses.items())[:3]))
        if p.message and p.message != "preview":
            self.bar.write(p.message)
        if p.preview is not None and self.preview_dir:
            import os

            from ..trainer.grids import save_png, to_uint8

            path = os.path.join(self.preview_dir, f"preview_{p.step:05d}.png")
            save_png(to_uint8(p.preview)[0], path)
            self.bar.write(f"preview: {path}")
        self.bar.update(max(0, p.stage_step - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
