"""The subjects table: parsing, path resolution, and one clear error per malformed case."""

from pathlib import Path

import pytest

from m2diff_monai.errors import InputError
from preprocessing.subjects import SubjectRow, read_subjects


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # read_subjects checks existence only; intake reads the contents
    return path


@pytest.fixture()
def table_dir(tmp_path: Path) -> Path:
    for rel in (
        "s1/ld.nii.gz",
        "s1/sd.nii.gz",
        "s1/t1.nii.gz",
        "s1/lesion.nii.gz",
        "s2/ld.nii.gz",
        "s2/sd.nii.gz",
        "s3/sd.nii.gz",
    ):
        _touch(tmp_path / "data" / rel)
    return tmp_path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_good_table_with_relative_and_absolute_paths(table_dir: Path):
    absolute_t1 = (table_dir / "data" / "s1" / "t1.nii.gz").resolve()
    csv = _write(
        table_dir / "data" / "subjects.csv",
        "subject_id,ld_pet,sd_pet,mri,split,drf,mask_lesion,age\n"
        f"s1,s1/ld.nii.gz,./s1/sd.nii.gz,{absolute_t1},Train,4,s1/lesion.nii.gz,71\n"
        "s2, s2/ld.nii.gz ,../data/s2/sd.nii.gz,,,,,\n"
        "\n"
        "s_3-b,,s3/sd.nii.gz,,test,20,,\n",
    )
    rows = read_subjects(csv, require=())
    base = (table_dir / "data").resolve()
    assert rows[0] == SubjectRow(
        "s1",
        base / "s1/ld.nii.gz",
        base / "s1/sd.nii.gz",
        absolute_t1,
        "train",
        4.0,
        {"lesion": base / "s1/lesion.nii.gz"},
    )
    assert rows[1] == SubjectRow("s2", base / "s2/ld.nii.gz", base / "s2/sd.nii.gz", None, None, None, {})
    assert rows[2].subject_id == "s_3-b" and rows[2].ld_pet is None and rows[2].split == "test"
    assert rows[2].drf == 20.0
    assert all(p.is_absolute() for r in rows for p in r.files().values())
    assert list(rows[0].files()) == ["ld_pet", "sd_pet", "mri", "mask_lesion"]


def test_paths_resolve_against_the_table_folder_not_the_cwd(table_dir: Path, monkeypatch):
    _write(table_dir / "data" / "subjects.csv", "subject_id,ld_pet,sd_pet,mri\ns1,s1/ld.nii.gz,,\n")
    monkeypatch.chdir(table_dir)  # s1/ld.nii.gz does not exist relative to the cwd
    rows = read_subjects(Path("data/subjects.csv"))
    assert rows[0].ld_pet == (table_dir / "data" / "s1" / "ld.nii.gz").resolve()


HEADER = "subject_id,ld_pet,sd_pet,mri\n"


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("subject_id,ld_pet,sd_pet\ns1,s1/ld.nii.gz,,\n", ["lacks column(s) mri", "found: subject_id, ld_pet"]),
        ("subject_id,ld_pet,sd_pet,mri_t1\ns1,s1/ld.nii.gz,,\n", ["lacks column(s) mri"]),
        (
            HEADER + "s1,s1/ld.nii.gz,,\ns2,s2/ld.nii.gz,,\ns1,s2/ld.nii.gz,,\n",
            ["line 4", "duplicate subject_id 's1'", "first on line 2", "subject s1"],
        ),
        (HEADER + "s 1,s1/ld.nii.gz,,\n", ["line 2", "subject_id 's 1' may contain only"]),
        (HEADER + "s1/../x,s1/ld.nii.gz,,\n", ["subject_id 's1/../x'"]),
        (HEADER + ",s1/ld.nii.gz,,\n", ["line 2", "empty subject_id"]),
        (
            "subject_id,ld_pet,sd_pet,mri,split\ns1,s1/ld.nii.gz,,,training\n",
            ["subject s1", "split 'training' is not one of train|val|test"],
        ),
        ("subject_id,ld_pet,sd_pet,mri,drf\ns1,s1/ld.nii.gz,,,0\n", ["subject s1", "drf '0' must be a positive"]),
        ("subject_id,ld_pet,sd_pet,mri,drf\ns1,s1/ld.nii.gz,,,-4\n", ["drf '-4'"]),
        ("subject_id,ld_pet,sd_pet,mri,drf\ns1,s1/ld.nii.gz,,,four\n", ["drf 'four'"]),
        ("subject_id,ld_pet,sd_pet,mri,drf\ns1,s1/ld.nii.gz,,,nan\n", ["drf 'nan'"]),
        (HEADER + "s1,,s1/sd.nii.gz,\n", ["subject s1", "line 2: column ld_pet is empty but required"]),
        (HEADER + "s1,s1/ld.nii.gz,,,extra\n", ["line 2 has 5 fields but the header has 4"]),
        ("subject_id,ld_pet,sd_pet,mri,mask_a b\ns1,s1/ld.nii.gz,,,\n", ["mask column 'mask_a b'"]),
        ("subject_id,ld_pet,sd_pet,mri,mri\ns1,s1/ld.nii.gz,,,\n", ["duplicate column(s) mri"]),
        (HEADER, ["header but no subjects"]),
        ("", ["subjects table is empty"]),
    ],
    ids=[
        "missing-column",
        "misspelt-column",
        "duplicate-id",
        "space-in-id",
        "slash-in-id",
        "empty-id",
        "bad-split",
        "zero-drf",
        "negative-drf",
        "text-drf",
        "nan-drf",
        "empty-required-ld",
        "extra-field",
        "bad-mask-name",
        "duplicate-column",
        "header-only",
        "empty-table",
    ],
)
def test_malformed_tables_name_the_row_and_the_table(table_dir: Path, text: str, fragments: list[str]):
    csv = _write(table_dir / "data" / "subjects.csv", text)
    with pytest.raises(InputError) as info:
        read_subjects(csv)
    line = str(info.value)
    assert "\n" not in line
    assert f"file {csv}" in line  # table-level problems name the table
    for fragment in fragments:
        assert fragment in line


@pytest.mark.parametrize(
    "column, cell",
    [("ld_pet", "s1/nope.nii.gz"), ("mri", "s1/t1_missing.nii.gz"), ("mask_lesion", "../elsewhere/m.nii.gz")],
)
def test_missing_listed_file_names_subject_column_line_and_resolved_file(table_dir: Path, column: str, cell: str):
    cells = {"subject_id": "s1", "ld_pet": "s1/ld.nii.gz", "sd_pet": "", "mri": "", "mask_lesion": ""}
    cells[column] = cell
    csv = _write(
        table_dir / "data" / "subjects.csv",
        ",".join(cells) + "\ns0,s2/ld.nii.gz,,,\n" + ",".join(cells.values()) + "\n",
    )
    with pytest.raises(InputError) as info:
        read_subjects(csv)
    err = info.value
    assert err.subject == "s1"
    assert err.path == str((table_dir / "data" / cell).resolve())
    assert f"{column} listed on subjects.csv line 3 does not exist" in str(err)


def test_a_folder_is_not_a_file(table_dir: Path):
    csv = _write(table_dir / "data" / "subjects.csv", HEADER + "s1,s1,,\n")
    with pytest.raises(InputError, match="ld_pet listed on subjects.csv line 2 is not a file"):
        read_subjects(csv)


def test_require_selects_the_path_columns_that_must_be_filled(table_dir: Path):
    csv = _write(table_dir / "data" / "subjects.csv", HEADER + "s3,,s3/sd.nii.gz,\n")
    assert read_subjects(csv, require=("sd_pet",))[0].sd_pet is not None  # simulate makes ld_pet later
    with pytest.raises(InputError, match="column ld_pet is empty"):
        read_subjects(csv)
    with pytest.raises(InputError, match="column mri is empty"):
        read_subjects(csv, require=("sd_pet", "mri"))
    with pytest.raises(ValueError):
        read_subjects(csv, require=("split",))


def test_missing_table_and_utf8_bom(table_dir: Path):
    with pytest.raises(InputError, match="subjects table does not exist"):
        read_subjects(table_dir / "nope.csv")
    csv = table_dir / "data" / "bom.csv"
    csv.write_bytes(("\ufeff" + HEADER + "s1,s1/ld.nii.gz,,\n").encode("utf-8"))  # Excel's "CSV UTF-8"
    assert read_subjects(csv)[0].subject_id == "s1"
