"""Screenshots of the Prefect UI for the docs: the run form, a finished run, its Artifacts tab, table and report.

    python tools/screenshots.py --api http://127.0.0.1:4200/api --out docs/service

Needs a running `ftstudy serve` with at least one completed study run, and Debian's Chromium
(`apt-get install chromium`), driven headless from the command line. The run's Artifacts tab is
opened by a click, which needs Playwright (`pip install playwright`; it drives that same Chromium,
nothing is downloaded); without it that one screenshot is skipped.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if exe := shutil.which(name):
            return exe
    raise SystemExit("screenshots: no Chromium found; install Debian's package: apt-get install chromium")


def shoot(url: str, out: Path, size: str = "1440,1200", wait_ms: int = 20000) -> Path:
    """Render `url` headless and save a PNG; the virtual time budget lets the single-page app load its data."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not out.exists():
        raise SystemExit(f"screenshots: chromium failed on {url}:\n{result.stderr[-2000:]}")
    return out


def targets(api: str) -> dict[str, str]:
    """UI addresses of the study's run form and of the newest completed study run's report artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey,
                                                DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ui = api.removesuffix("/").removesuffix("/api")
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        study = client.read_deployment_by_name("ftstudy/study")
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[study.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
        if not runs:
            raise SystemExit("screenshots: no completed run of ftstudy/study yet; run a study first")
        found = {}
        for key in ("ftstudy-table", "ftstudy-report"):
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[runs[0].id])))
            if not artifacts:
                raise SystemExit(f"screenshots: study run {runs[0].name} has no {key} artifact")
            found[key] = artifacts[0]
    return {"run-form": f"{ui}/deployments/deployment/{study.id}/run",
            "results-table": f"{ui}/artifacts/artifact/{found['ftstudy-table'].id}",
            "report-artifact": f"{ui}/artifacts/artifact/{found['ftstudy-report'].id}",
            "study-run": f"{ui}/runs/flow-run/{runs[0].id}"}


def shoot_tab(url: str, tab: str, out: Path, size: tuple[int, int] = (1440, 1300)) -> Path | None:
    """A page after clicking one of its tabs (the UI keeps the tab out of the URL); None without Playwright."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print(f"screenshots: skipping {out.name}: clicking the {tab} tab needs Playwright (pip install playwright)")
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        page.goto(url)
        page.get_by_text(tab, exact=True).first.click(timeout=30_000)
        page.wait_for_timeout(4000)  # the tab's cards load after the click
        page.screenshot(path=str(out))
        browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:4200/api", help="PREFECT_API_URL of the running server")
    parser.add_argument("--out", default="docs/service", help="folder for the PNGs")
    args = parser.parse_args(argv)
    pages = targets(args.api)
    for name, url in pages.items():
        print(shoot(url, Path(args.out) / f"{name}.png"), "<-", url)
    if shot := shoot_tab(pages["study-run"], "Artifacts", Path(args.out) / "artifacts-tab.png"):
        print(shot, "<-", pages["study-run"], "(Artifacts tab)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
