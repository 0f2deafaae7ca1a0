"""Ingest of hostile input (issue 16): symbolic links, unreadable folders, headers that claim huge images, cut
files, off-grid slices, and nothing in the outputs that names a patient or matches a source file's plain hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from factories import ct_slice, pseudo, write, write_series

from pe_triage import schema as S
from pe_triage.cli import main
from pe_triage.config import IngestConfig
from pe_triage.dicom import Pseudonymizer
from pe_triage.ingest import IngestError, ingest_site, quarantined_files
from pe_triage.storage import Location

CFG = IngestConfig(workers=1)


def run(src: Path, out: Path, site: str = "test-site") -> dict:
    return ingest_site(site, str(src), str(out), pseudo=pseudo(site), config=CFG)


def quarantine(out: Path, site: str = "test-site") -> list[dict]:
    return pq.read_table(out / "_quarantine" / f"site={site}" / "quarantine.parquet").to_pylist()


def output_strings(out: Path) -> list[str]:
    """Every string an output holds: the text of JSON files, every string cell of every Parquet table."""
    found = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            found += [str(v) for c in table.column_names if table.schema.field(c).type == "string"
                      for v in table.column(c).to_pylist()]
        else:
            found.append(path.read_text())
        found.append(str(path.relative_to(out)))
    return found


def test_symlink_loops_end_and_count_each_file_once(tmp_path: Path) -> None:
    src = tmp_path / "in"
    write_series(src, 3)
    (src / "a").symlink_to(".")  # ln -s . in/a; ln -s . in/b: endless, memory growing, before the fix
    (src / "b").symlink_to(".")
    code = ("import json, sys; from pe_triage.config import IngestConfig; from pe_triage.dicom import DEMO_KEY, Pseudonymizer;"
            "from pe_triage.ingest import ingest_site; r = ingest_site('s', sys.argv[1], sys.argv[2], "
            "pseudo=Pseudonymizer(DEMO_KEY, 's'), config=IngestConfig(workers=1));"
            "print(json.dumps([r['files'], r['skipped_links']]))")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60, check=True)
    files, skipped = json.loads(proc.stdout)
    assert files == {"seen": 3, "ingested": 3, "duplicates": 0, "quarantined": 0}
    assert skipped == 2


def test_links_inside_the_source_count_each_real_file_once(tmp_path: Path) -> None:
    src = tmp_path / "in"
    files = write_series(src / "series", 3)
    (src / "a").symlink_to(".")  # one loop: every file 41 times before the fix
    (src / "alias.dcm").symlink_to(Path("series") / files[0].name)
    os.link(files[1], src / "hard-link.dcm")
    report = run(src, tmp_path / "out")
    assert report["files"] == {"seen": 3, "ingested": 3, "duplicates": 0, "quarantined": 0}
    assert report["skipped_links"] == 3


def test_links_leaving_the_source_are_quarantined_and_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in"
    write_series(src, 2)
    outside = write_series(tmp_path / "elsewhere", 2, series="1.2.3.4.9")
    (src / "evil.dcm").symlink_to(outside[0])
    (src / "mount").symlink_to(tmp_path / "elsewhere")
    (src / "up").symlink_to("..")
    (src / "broken.dcm").symlink_to(tmp_path / "gone.dcm")
    reads: list[str] = []
    real_read = Location.read

    def read(self: Location, path: str, nbytes: int | None = None) -> bytes:
        reads.append(path)
        return real_read(self, path, nbytes)

    monkeypatch.setattr(Location, "read", read)
    report = run(src, tmp_path / "out")
    assert report["files"] == {"seen": 6, "ingested": 2, "duplicates": 0, "quarantined": 4}
    assert report["quarantine_reasons"] == {"outside_source": 4}
    assert not [p for p in reads if any(name in p for name in ("evil", "mount", "/up/", "broken"))]
    rows = quarantined_files("test-site", str(src), str(tmp_path / "out"), pseudo=pseudo())
    assert sorted(r["path"] for r in rows) == ["broken.dcm", "evil.dcm", "mount", "up"]


def test_unreadable_folder_is_quarantined_and_the_rest_ingested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 does not stop root (CI): the listing is made to fail as it would for another user."""
    src = tmp_path / "in"
    write_series(src / "ok", 3)
    write_series(src / "locked", 2, series="1.2.3.4.9")
    locked_file = write_series(src / "open", 1, series="1.2.3.4.7")[0]
    real_scandir, real_read = os.scandir, Location.read

    def scandir(path: str) -> object:
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def read(self: Location, path: str, nbytes: int | None = None) -> bytes:
        if path == str(locked_file):
            raise PermissionError(13, "Permission denied", path)
        return real_read(self, path, nbytes)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(Location, "read", read)
    report = run(src, tmp_path / "out")
    assert report["files"] == {"seen": 5, "ingested": 3, "duplicates": 0, "quarantined": 2}
    assert sorted((r[S.PATH_PSEUDONYM], r[S.REASON]) for r in quarantine(tmp_path / "out")) == sorted(
        [(pseudo()("path", "locked"), "unreadable"), (pseudo()("path", "open/IM0000.dcm"), "unreadable")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder; the monkeypatched variant covers it")
def test_chmod_000_folder_is_quarantined(tmp_path: Path) -> None:
    src = tmp_path / "in"
    write_series(src / "ok", 3)
    write_series(src / "locked", 2, series="1.2.3.4.9")
    (src / "locked").chmod(0)
    try:
        report = run(src, tmp_path / "out")
    finally:
        (src / "locked").chmod(0o755)
    assert report["files"]["ingested"] == 3 and report["quarantine_reasons"] == {"unreadable": 1}


def test_no_source_path_in_any_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "SMITH_JOHN_MRN4711"
    write_series(src / "DOE_JANE_1960", 2)
    (src / "DOE_JANE_1960" / "notes.txt").write_text("not DICOM")
    (src / "loop").symlink_to(".")
    with caplog.at_level(logging.DEBUG):
        report = run(src, tmp_path / "out")
    text = "\n".join([*output_strings(tmp_path / "out"), caplog.text, json.dumps(report)])
    for phi in ("SMITH", "MRN4711", "DOE_JANE", "notes.txt", str(tmp_path)):
        assert phi not in text, phi
    assert report["files"]["quarantined"] == 1
    assert report["source"] == pseudo()("source", str(src))


def test_source_digest_is_keyed_and_still_finds_duplicates(tmp_path: Path) -> None:
    src = tmp_path / "in"
    files = write_series(src, 2)
    shutil.copy(files[0], src / "copy.dcm")
    report = run(src, tmp_path / "out")
    plain = {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert plain.isdisjoint(output_strings(tmp_path / "out"))  # nobody holding a file can find it in the dataset
    assert report["duplicates"]["same_content_or_pixels"] == 1  # same bytes still give the same value
    rows = pads.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table().to_pylist()
    assert {r[S.SOURCE_HMAC] for r in rows} == {pseudo().source_digest(f.read_bytes()) for f in files}
    other = Pseudonymizer(b"another deployment secret", "test-site")
    assert {r[S.SOURCE_HMAC] for r in rows}.isdisjoint(other.source_digest(f.read_bytes()) for f in files)
    assert quarantine(tmp_path / "out")[0][S.SOURCE_HMAC] == pseudo().source_digest(files[0].read_bytes())


_HUGE_RLE = """
import json, resource, struct, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from factories import ct_slice, pseudo, write
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless
from pe_triage.config import IngestConfig
from pe_triage.ingest import ingest_site

ds = ct_slice(pixels=False, size=40000)  # 3.2 GB of pixels once decoded
segment = bytes([0x81, 0]) * 60000  # PackBits runs far shorter than the declared image
ds.PixelData = encapsulate([struct.pack("<16L", 2, 64, 64 + len(segment), *[0] * 13) + segment * 2])
ds.file_meta.TransferSyntaxUID = RLELossless
size = write(ds, Path(sys.argv[1]) / "huge.dcm").stat().st_size
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = ingest_site("test-site", sys.argv[1], sys.argv[2], pseudo=pseudo(), config=IngestConfig(workers=1))
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"size": size, "reasons": report["quarantine_reasons"], "grown": grown}))
"""


def test_huge_declared_image_is_refused_from_its_header_with_bounded_memory(tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _HUGE_RLE, str(tmp_path / "in"), str(tmp_path / "out"), str(tests)],
                          capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["size"] < 300_000
    assert result["reasons"] == {"implausible_header": 1}
    assert result["grown"] < 200 * 2**20, f"peak memory grew {result['grown'] / 2**20:.0f} MiB"


def test_limits_come_from_the_config(tmp_path: Path) -> None:
    write_series(tmp_path / "in", 2)
    report = ingest_site("test-site", str(tmp_path / "in"), str(tmp_path / "out"), pseudo=pseudo(),
                         config=IngestConfig(workers=1, max_rows=16))
    assert report["quarantine_reasons"] == {"implausible_header": 2}
    assert "Rows 32 > 16" in quarantine(tmp_path / "out")[0][S.DETAIL]


def test_cut_header_is_truncated_not_another_reason(tmp_path: Path) -> None:
    src = tmp_path / "in"
    files = write_series(src, 3)
    data = files[0].read_bytes()
    for n in (300, 400, 600):
        (src / f"cut-{n}.dcm").write_bytes(data[:n])
    report = run(src, tmp_path / "out")
    assert report["quarantine_reasons"] == {"truncated": 3}


def test_damaged_header_values_are_quarantined_and_the_run_completes(tmp_path: Path) -> None:
    """pydicom converts a value when it is first read, and a damaged one fails in any way: two values where
    one is expected (TypeError), a VR changed from UI to UL (BytesLengthException), an unknown VR
    (NotImplementedError). Each used to end the whole ingest."""
    src = tmp_path / "in"
    write_series(src, 3)
    write(ct_slice(sop="9.1", series="9", PixelPaddingValue=[1, 2]), src / "two-paddings.dcm")
    write(ct_slice(sop="9.2", series="9", PixelRepresentation=[1, 1]), src / "two-representations.dcm")
    data = (src / "IM0000.dcm").read_bytes()
    for name, vr, sop in (("vr-ul.dcm", b"UL", b"7"), ("vr-unknown.dcm", b"U\xec", b"8")):  # SOP Class UID's VR
        damaged = data.replace(b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00" + vr)
        (src / name).write_bytes(damaged.replace(b"1.2.3.4.5.1\x00", b"1.2.3.4.5." + sop + b"\x00"))
    report = run(src, tmp_path / "out")
    assert report["files"]["ingested"] == 3
    details = sorted(r[S.DETAIL] for r in quarantine(tmp_path / "out"))
    assert report["quarantine_reasons"] == {"missing_tag": 4}, details
    assert all(d.startswith("malformed header value") for d in details)


def test_slices_off_the_z_grid_are_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "in"
    for i, z in enumerate([0.0, 1.0, 2.0, 4.0, 5.0, 6.0]):  # one slice missing at z=3
        write(ct_slice(sop=f"1.2.3.4.5.{i + 1}", z=z, instance=i + 1), src / f"a{i}.dcm")
    write_series(src / "regular", 4, series="1.2.3.4.9")
    with caplog.at_level(logging.WARNING):
        report = run(src, tmp_path / "out")
    series = pseudo()("series", "1.2.3.4.5")
    assert report["z_grid_warnings"] == [{"series_uid": series, "irregular_steps": 1, "step_mm": 1.0}]
    assert series in caplog.text and "1.2.3.4.5" not in caplog.text.replace(series, "")


def test_site_name_must_match_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_series(tmp_path / "in", 1)
    with pytest.raises(IngestError, match="site name"):
        ingest_site("abc\n", str(tmp_path / "in"), str(tmp_path / "out"), pseudo=pseudo("abc\n"), config=CFG)
    assert main(["ingest", "--site", "abc\n", "--source", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                 "--demo"]) == 2
    assert "site name" in caplog.text
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
