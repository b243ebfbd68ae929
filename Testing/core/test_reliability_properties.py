"""Property-based tests (hypothesis) of the manifest and report parsers: any text round-trips, any bytes either parse
or give the parser's own error naming the file, and no error message quotes the report."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from CCELLACore.data.manifest import read_manifest, write_manifest
from CCELLACore.data.study import Study
from CCELLACore.errors import ManifestError
from CCELLACore.reports import REPORT_CHAR_LIMIT, ReportError, check_report, read_report_file

# Small example counts: these run in the suite's time budget (about 2 s together); no example database on disk.
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Report text as people type it: any printable character (accents, µ, ≥, quotes, commas), tabs and line breaks.
TYPED = st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\n\r\t,\"'")
IDS = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=12)


@FAST
@given(st.lists(st.tuples(IDS, IDS, st.text(TYPED, max_size=80)), min_size=1, max_size=5, unique_by=lambda r: r[0]))
def test_any_typed_manifest_round_trips(rows):
    studies = [Study(case_id=c, patient_id=p, images={"AxT2": f"img/{i}.nii.gz"}, report=r)
               for i, (c, p, r) in enumerate(rows)]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = read_manifest(write_manifest(studies, Path(tmp) / "manifest.csv"))
    assert manifest.problems == []
    # Report line breaks are stored as \n (a lone \r would read back as a row break: found by this test).
    assert [(s.case_id, s.patient_id) for s in manifest.studies] == [(c, p) for c, p, _ in rows]
    for study, (_, _, report) in zip(manifest.studies, rows):
        assert study.report.replace("\r\n", "\n").replace("\r", "\n") == report.replace("\r\n", "\n").replace("\r", "\n")


@FAST
@given(st.binary(max_size=400), st.sampled_from([b"", b"case_id,patient_id,axt2,report\n"]))
def test_any_bytes_give_a_manifest_or_a_manifest_error_naming_the_file(data, header):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.csv"
        path.write_bytes(header + data)
        try:
            manifest = read_manifest(path)
        except ManifestError as exc:
            assert str(exc).startswith(str(path))
            return
    for problem in manifest.problems:  # every skipped row says where it was
        assert "manifest.csv" in problem.reason


@FAST
@given(st.binary(max_size=300))
def test_any_report_file_is_text_or_a_report_error_without_its_content(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.txt"
        path.write_bytes(data)
        try:
            text = read_report_file(path)
        except ReportError as exc:
            message = str(exc)
            assert message.startswith(str(path))
            stripped = message[len(str(path)):]
            words = [w for w in data.decode("utf-8", "replace").split() if len(w) >= 6]
            assert not any(w in stripped for w in words)  # never quotes the report
            return
    assert check_report(text) == text and len(text) <= REPORT_CHAR_LIMIT


@FAST
@given(st.text(max_size=200))
def test_check_report_accepts_typed_text_and_refuses_the_rest_by_position(text):
    try:
        assert check_report(text, source="case c1") == text
    except ReportError as exc:
        assert str(exc).startswith("case c1: report has") and "position" in str(exc)
        assert any(ord(ch) < 32 and ch not in "\t\n\f\r" or ch == "\x7f" or 0xD800 <= ord(ch) < 0xE000 for ch in text)
