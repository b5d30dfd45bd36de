"""A report page with a 20-image study, to its first image: the API calls the review page makes before it shows
the image the model scored highest, timed over HTTP on a fresh study each round (nothing cached yet), and once
more on the same study (a second open: the rendered frame cached). The study's 20 CT instances (pydicom's
693_UNCR, 512 x 512, fresh UIDs) come in by C-STORE through MedBridge's listener; its report names a heatmap
overlay and a heatmap layer per image, as the imaging worker writes them.

    .venv/bin/python bench/review_page.py --rounds 7

The page's calls, in its order: POST claim, GET /api/reports/{id}, QIDO-RS instances, the series thumbnail,
/rendered of the top image (viewport 512,512, as the page asks), then the heatmap layer and its blend over the
frame (here, in this process, as the viewer does). Baseline in the same rounds: GET /health (the floor of a
request) and the bare render of that image in this process (integration.dicom.render.render, the work behind
/rendered). Target (issue 17): under 2 s to the first image.
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402

from integration.app.http import create_app  # noqa: E402
from integration.app.services import Services  # noqa: E402
from integration.app.settings import Settings  # noqa: E402
from integration.auth.embedded import embedded_token  # noqa: E402
from integration.auth.principal import ROLES  # noqa: E402
from integration.db.artifacts import put_artifact  # noqa: E402
from integration.db.store import Store  # noqa: E402
from integration.dicom.network.listener import DicomListener  # noqa: E402
from integration.dicom.render import Rendering, render  # noqa: E402
from integration.reports.writer import write_report  # noqa: E402
from schemas.events import ImagingInferenceCompleted, InstanceFinding  # noqa: E402
from viewer import imaging  # noqa: E402

IMAGES = 20
TOP = 7  # the image the model scored highest: the one the page shows first
STEPS = ("claim", "report", "instances", "thumbnail", "rendered", "layer", "blend")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _heat(n: int) -> tuple[bytes, bytes]:
    """A heatmap layer (grey, a soft blob, as the worker stores it) and an overlay (RGB) at 512 x 512."""
    rows, cols = np.ogrid[:512, :512]
    blob = np.exp(-((rows - 150 - 10 * n) ** 2 + (cols - 200) ** 2) / (2 * 40.0**2))
    layer = (blob * 255 + 0.5).astype(np.uint8)
    overlay = np.stack([layer, 255 - layer, np.full_like(layer, 60)], axis=-1)
    return _png(Image.fromarray(layer, mode="L")), _png(Image.fromarray(overlay, mode="RGB"))


def _ct_path() -> str:
    path = get_testdata_file("693_UNCR.dcm", download=False)
    if not isinstance(path, str):
        raise SystemExit("pydicom's test file 693_UNCR.dcm is missing: install pydicom-data (pip install pydicom-data)")
    return path


def send_study(port: int) -> tuple[str, str, list[str]]:
    """20 instances of one new study by C-STORE; its study and series UIDs and the SOP UIDs in order."""
    template = dcmread(_ct_path())
    study, series = generate_uid(), generate_uid()
    ae = AE(ae_title="BENCH_SCU")
    ae.add_requested_context(template.SOPClassUID, template.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
    assert assoc.is_established, "the listener refused the association"
    sops = []
    try:
        for n in range(1, IMAGES + 1):
            ds = dcmread(_ct_path())
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, n
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            assert assoc.send_c_store(ds).Status == 0x0000
            sops.append(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
    return study, series, sops


def write_study_report(store: Store, study: str, series: str, sops: list[str]) -> str:
    findings = []
    for n, sop in enumerate(sops, start=1):
        layer, overlay = _heat(n)
        with store.session() as s:
            layer_id, overlay_id = put_artifact(s, layer, "image/png"), put_artifact(s, overlay, "image/png")
        p = 0.93 if n == TOP else 0.1 + 0.02 * n
        findings.append(InstanceFinding(sop_instance_uid=sop, series_instance_uid=series,
                                        probabilities={"synthetic_round_lesion": p},
                                        heatmap_artifact_id=overlay_id, heatmap_layer_artifact_id=layer_id))
    return write_report(store, ImagingInferenceCompleted(
        source_event_id=generate_uid(), study_instance_uid=study, revision=1, patient_ref=None,
        imaging_study_ref=None, model_name="bench-lesion-net", model_version="0.1.0", findings=findings))


def open_page(client: httpx.Client, report_id: str) -> dict[str, float]:
    """The review page's calls up to its first image (with the heatmap beside it); ms per step."""
    times: dict[str, float] = {}

    def timed(step: str, call: Callable[[], object]) -> object:
        t = time.perf_counter()
        out = call()
        times[step] = (time.perf_counter() - t) * 1000
        return out

    timed("claim", lambda: client.post(f"/api/reports/{report_id}/claim").raise_for_status())
    detail = timed("report", lambda: client.get(f"/api/reports/{report_id}").raise_for_status().json())
    study = detail["study_instance_uid"]  # type: ignore[index]
    items = timed("instances", lambda: client.get(
        f"/dicomweb/studies/{study}/instances", params={"includefield": "00200013,00080060,0008103E"},
        headers={"Accept": "application/dicom+json"}).raise_for_status().json())
    series = items[0]["0020000E"]["Value"][0]  # type: ignore[index]
    timed("thumbnail", lambda: client.get(f"/dicomweb/studies/{study}/series/{series}/thumbnail",
                                          headers={"Accept": "image/png"}).raise_for_status())
    top = max(detail["instances"], key=lambda i: i["probabilities"]["synthetic_round_lesion"])  # type: ignore[index]
    frame = timed("rendered", lambda: client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{top['sop_instance_uid']}/rendered",
        params={"viewport": "512,512"}, headers={"Accept": "image/png"}).raise_for_status().content)
    layer = timed("layer", lambda: client.get(
        f"/api/artifacts/{top['heatmap_layer_artifact_id']}").raise_for_status().content)
    timed("blend", lambda: imaging.overlay_layer(frame, layer, 0.6))  # type: ignore[arg-type]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="fresh 20-image studies, one per round")
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-review-"))
    url = args.database_url or f"sqlite:///{tmp / 'store.db'}"
    store = Store(url)
    store.start()
    settings = Settings(data_dir=tmp, database_url=url, viewer_enabled=False, audit_enabled=True)  # type: ignore[call-arg]
    listener = DicomListener(store, tmp / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                             study_quiet_seconds=60)
    listener.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Services(settings, store)), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    token = embedded_token(settings, list(ROLES), "bench", ttl_seconds=3600)
    cold: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    floor: list[float] = []
    bare: list[float] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as client:
        warmup = write_study_report(store, *send_study(listener.port))
        open_page(client, warmup)  # imports, first connection, first decode
        for _ in range(args.rounds):
            study, series, sops = send_study(listener.port)
            report_id = write_study_report(store, study, series, sops)
            for _ in range(5):
                t = time.perf_counter()
                client.get("/health").raise_for_status()
                floor.append((time.perf_counter() - t) * 1000)
            path = next(i.path for i in store.study_instances(study) if i.sop_instance_uid == sops[TOP - 1])
            t = time.perf_counter()
            render(dcmread(path), media_type="image/png", rendering=Rendering(viewport=(512, 512)))
            bare.append((time.perf_counter() - t) * 1000)
            cold.append(open_page(client, report_id))
            warm.append(open_page(client, report_id))
    server.should_exit = True
    listener.stop()
    store.stop()

    def summary(rounds: list[dict[str, float]], label: str) -> None:
        first = [sum(r[s] for s in STEPS[:5]) for r in rounds]
        with_heat = [sum(r.values()) for r in rounds]
        steps = ", ".join(f"{s} {statistics.median(r[s] for r in rounds):.1f}" for s in STEPS)
        print(f"{label}: to first image median {statistics.median(first):.0f} ms (max {max(first):.0f}); "
              f"with the heatmap beside it median {statistics.median(with_heat):.0f} ms (max {max(with_heat):.0f})")
        print(f"  per step, median ms: {steps}")

    print(f"store: {store.engine.dialect.name}; {args.rounds} rounds, a fresh {IMAGES}-image study each")
    summary(cold, "first open (nothing cached)")
    summary(warm, "second open (frame cached)")
    print(f"baseline: GET /health median {statistics.median(floor):.1f} ms; bare render of the image in-process "
          f"median {statistics.median(bare):.1f} ms (target: first image under 2000 ms)")


if __name__ == "__main__":
    main()
