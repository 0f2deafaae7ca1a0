"""The same ingest from an S3 prefix (moto server on loopback) as from a local folder."""

from __future__ import annotations

from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pytest
from factories import ct_slice, pseudo, write, write_series

from pe_triage import schema as S
from pe_triage.config import IngestConfig
from pe_triage.ingest import ingest_site
from pe_triage.storage import location

pytestmark = pytest.mark.slow


def upload(folder: Path, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


def test_ingest_from_s3_prefix_matches_local(s3_endpoint: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_series(src / "a", 4)
    write_series(src / "b", 3, series="1.2.3.4.6", name="{:d}")  # names without suffix
    (src / "README.txt").write_text("export notes")
    write(ct_slice(modality="MR", sop="7.7.7", series="7.7"), src / "c" / "mr")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,sop_uid,label,diagnosis\nPAT-0001,,,pe\nPAT-0001,1.2.3.4.5.2,pe,\n")
    boto3.client("s3").create_bucket(Bucket="hospital")
    upload(src, "hospital", "exports/2026-11")
    boto3.client("s3").upload_file(str(labels), "hospital", "exports/labels.csv")

    cfg = IngestConfig(workers=2, min_files_per_worker=1)  # workers read from S3 too
    local = ingest_site("s3site", str(src), str(tmp_path / "local"), pseudo=pseudo("s3site"), labels=str(labels), config=cfg)
    remote = ingest_site(
        "s3site", "s3://hospital/exports/2026-11", "s3://hospital/datasets/slices",
        pseudo=pseudo("s3site"), labels="s3://hospital/exports/labels.csv", config=cfg,
    )
    for key in ("files", "duplicates", "quarantine_reasons", "dataset"):
        assert remote[key] == local[key], key
    assert remote["files"] == {"seen": 9, "ingested": 7, "duplicates": 0, "quarantined": 2}

    out = location("s3://hospital/datasets/slices")
    table = pads.dataset(f"{out.root}/site=s3site", filesystem=out.fs, format="parquet").to_table()
    assert table.num_rows == 7
    assert sorted(table.column(S.LABEL).to_pylist()).count("pe") == 1
    assert out.exists(out.join("_quarantine/site=s3site/quarantine.parquet"))
    assert not out.exists(out.join("_staging/site=s3site"))

    again = ingest_site("s3site", "s3://hospital/exports/2026-11", "s3://hospital/datasets/slices",
                        pseudo=pseudo("s3site"), labels="s3://hospital/exports/labels.csv", config=cfg)
    assert again["files"]["ingested"] == 0 and again["duplicates"]["already_ingested"] == 7
