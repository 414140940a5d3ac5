"""nbdecl's fast path (head up to the first code cell + the tail's top-level metadata) gives the
same Declaration as parsing the whole file, on every layout; other layouts fall back to the full
parse. Notebooks are written by nbformat (as Jupyter saves them), by juv (tests/data/juv, made by
`juv init`/`juv add`/`juv lock` 0.5.0), and by json.dumps in layouts Jupyter does not write."""

from __future__ import annotations

import base64
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest

from uvkerneld import nbdecl

DATA = Path(__file__).resolve().parent / "data"
SCRIPT = '# /// script\n# requires-python = ">=3.11"\n# dependencies = ["iniconfig==2.0.0"]\n# ///'
LOCK = 'version = 1\nrequires-python = ">=3.11"\n\n[[package]]\nname = "iniconfig"\nversion = "2.0.0"\n'


def notebook(cells: list[Any], metadata: dict[str, Any] | None = None) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata=metadata or {})
    nb.cells = cells
    return nb


def code(source: str, outputs: list[Any] | None = None, **metadata: Any) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(source, outputs=outputs or [], metadata=metadata)


def text_output(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_output("stream", name="stdout", text=text)


def image_output(size: int, seed: int = 0) -> nbformat.NotebookNode:
    blob = base64.b64encode(random.Random(seed).randbytes(size * 3 // 4)).decode()
    return nbformat.v4.new_output("display_data", data={"image/png": blob, "text/plain": "<Figure>"})


def save(path: Path, nb: nbformat.NotebookNode) -> Path:
    nbformat.write(nb, str(path))  # what Jupyter's contents manager writes
    return path


def fast(path: Path, chunk: int) -> nbdecl.Declaration | None:
    """The fast path on its own: raises _NotLaidOut where read_declaration would fall back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return nbdecl.read_laid_out(fd, os.fstat(fd).st_size, chunk)
    finally:
        os.close(fd)


def assert_fast_path_equals_full_parse(path: Path, chunks: tuple[int, ...] = (1, 5, 64, 4096, 65536)) -> Any:
    expected = nbdecl.read_declaration_full(path)
    for chunk in chunks:  # 1 and 5: reads grow many times and cut UTF-8 characters apart
        assert fast(path, chunk) == expected, chunk
        assert nbdecl.read_declaration(path, chunk=chunk, small_file=0) == expected, chunk
    assert nbdecl.read_declaration(path) == expected
    return expected


def assert_falls_back_with_the_same_result(path: Path) -> None:
    with pytest.raises(nbdecl._NotLaidOut):
        fast(path, 64)
    outcome = _outcome(nbdecl.read_declaration_full, path)
    assert _outcome(nbdecl.read_declaration, path, chunk=64, small_file=0) == outcome


def _outcome(reader: Any, path: Path, **options: int) -> Any:
    try:
        return reader(path, **options)
    except nbdecl.NotebookUnreadable as exc:
        return ("unreadable", str(exc))


JUV_CELL_METADATA = {"jupyter": {"source_hidden": True}}


@pytest.mark.parametrize("name", ["declared.ipynb", "locked.ipynb"])
def test_notebooks_written_by_juv(name: str) -> None:
    found = assert_fast_path_equals_full_parse(DATA / "juv" / name)
    assert found is not None and found.script_cell == 1 and '"iniconfig==2.0.0"' in found.script
    assert (found.lock is not None) == (name == "locked.ipynb")


def test_nbformat_juv_style_with_lock_and_nteract_mirror(tmp_path: Path) -> None:
    nb = notebook([code(SCRIPT, **JUV_CELL_METADATA), code("import iniconfig")], {
        "uv.lock": LOCK, "runt": {"schema_version": "1", "uv": {"dependencies": ["iniconfig==2.0.0"]}},
        "kernelspec": {"name": "uv", "display_name": "uv"}})
    found = assert_fast_path_equals_full_parse(save(tmp_path / "nb.ipynb", nb))
    uv = {"dependencies": ["iniconfig==2.0.0"]}
    assert found == nbdecl.Declaration(SCRIPT, 1, uv, "metadata.runt.uv", LOCK)


def test_legacy_uv_metadata_and_a_markdown_cell_before_the_code_cell(tmp_path: Path) -> None:
    nb = notebook([nbformat.v4.new_markdown_cell("# Title ✓"), nbformat.v4.new_raw_cell("raw"),
                   code(SCRIPT), code("x = 1")], {"uv": {"dependencies": ["toolz"]}})
    found = assert_fast_path_equals_full_parse(save(tmp_path / "nb.ipynb", nb))
    assert found is not None and found.script_cell == 3 and found.uv_key == "metadata.uv"


def test_declares_nothing_no_cells_only_markdown_and_empty_metadata(tmp_path: Path) -> None:
    assert assert_fast_path_equals_full_parse(save(tmp_path / "a.ipynb", notebook([]))) is None
    only_markdown = notebook([nbformat.v4.new_markdown_cell("# /// script\n# ///")])
    assert assert_fast_path_equals_full_parse(save(tmp_path / "b.ipynb", only_markdown)) is None
    # The block only counts in the first code cell.
    later = notebook([code("print(1)"), code(SCRIPT)], {"kernelspec": {"name": "uv", "display_name": "uv"}})
    assert assert_fast_path_equals_full_parse(save(tmp_path / "c.ipynb", later)) is None


def test_a_lock_larger_than_the_tail_chunk(tmp_path: Path) -> None:
    huge_lock = LOCK + "".join('\n[[package]]\nname = "p%d"\nversion = "1.0"\n' % n for n in range(20000))
    assert len(huge_lock) > 4 * nbdecl.CHUNK
    nb = notebook([code(SCRIPT)] + [code("x", [text_output("y" * 1000)]) for _ in range(100)],
                  {"uv.lock": huge_lock})
    path = save(tmp_path / "nb.ipynb", nb)
    found = assert_fast_path_equals_full_parse(path, chunks=(1024, nbdecl.CHUNK))
    assert found is not None and found.lock == huge_lock


def test_a_first_code_cell_with_5_mb_of_outputs(tmp_path: Path) -> None:
    outputs = [image_output(1_000_000, seed) for seed in range(5)]
    nb = notebook([nbformat.v4.new_markdown_cell("intro"), code(SCRIPT, outputs), code("y")],
                  {"uv.lock": LOCK})
    path = save(tmp_path / "nb.ipynb", nb)
    assert path.stat().st_size > 5_000_000
    found = assert_fast_path_equals_full_parse(path, chunks=(nbdecl.CHUNK,))
    assert found is not None and found.script == SCRIPT and found.script_cell == 2


def test_a_first_code_cell_without_a_block_is_not_decoded(tmp_path: Path, monkeypatch: Any) -> None:
    # A 5 MB plot in the first code cell of a notebook that declares nothing: the cell's bytes are
    # searched for the block's words, never decoded (the start-up cost of a big notebook).
    nb = notebook([code("import numpy", [image_output(5_000_000)]), code("y")],
                  {"language_info": {"name": "python"}})
    path = save(tmp_path / "nb.ipynb", nb)
    scanned: list[int] = []
    real_scan = nbdecl.fastjson.scan
    monkeypatch.setattr(nbdecl.fastjson, "scan",
                        lambda text, index: scanned.append(len(text)) or real_scan(text, index))
    assert assert_fast_path_equals_full_parse(path, chunks=(nbdecl.CHUNK,)) is None
    assert all(size < 100_000 for size in scanned), scanned
    # Escapes that could spell the block's words are decoded and read like the full parse does.
    for escaped in ("\\u0023 /// script", "# \\/// script", "# /\\/\\/ script"):
        text = path.read_text().replace('"import numpy"', '"%s\\n# dependencies = []\\n# ///"' % escaped)
        path.write_text(text)
        found = assert_fast_path_equals_full_parse(path, chunks=(nbdecl.CHUNK,))
        assert found is not None and found.script_cell == 1, escaped
        path = save(tmp_path / "nb.ipynb", nb)


@pytest.mark.parametrize("layout", ["jupyter", "colab"])
def test_a_big_first_code_cell_is_decoded_only_in_its_source(
        tmp_path: Path, monkeypatch: Any, layout: str) -> None:
    # A 50 MB plot next to the block, or a long coloured log (its \\u001b escapes could spell the
    # block's words): only the cell's "source" is searched and decoded, never its outputs.
    ansi = "".join("\x1b[32mepoch %d\x1b[0m loss=0.1\n" % n for n in range(60_000))
    scanned: list[int] = []
    real_scan = nbdecl.fastjson.scan
    monkeypatch.setattr(nbdecl.fastjson, "scan",
                        lambda text, index: scanned.append(len(text)) or real_scan(text, index))
    for source, outputs, expected_cell in [
        (SCRIPT, [image_output(2_000_000)], 1),
        ("train()", [text_output(ansi)], None),
        (SCRIPT.replace("# /// script", "\u0023 /// script"), [text_output(ansi)], 1),
    ]:
        nb = notebook([code(source, outputs), code("y")], {"uv.lock": LOCK})
        path = tmp_path / "nb.ipynb"
        path.write_bytes(nbformat.writes(nb).encode() if layout == "jupyter" else colab(nb))
        assert path.stat().st_size > nbdecl.BIG_CELL
        scanned.clear()
        found = assert_fast_path_equals_full_parse(path, chunks=(nbdecl.CHUNK,))
        assert (found and found.script_cell) == expected_cell and found is not None and found.lock == LOCK
        assert all(size < 100_000 for size in scanned), scanned


def test_a_big_first_code_cell_is_trusted_outside_its_source(tmp_path: Path) -> None:
    # The price of not decoding a big cell's outputs: a hand-made output holding a line laid out
    # like the cell's own "source" key is read as the source (no tool writes that; nbformat's
    # validation refuses the cell, and Jupyter shows its real source).
    blob = "z" * (nbdecl.BIG_CELL + 10)
    cell = ('  {\n   "cell_type": "code",\n   "execution_count": null,\n   "metadata": {},\n'
            '   "outputs": [{"name": "stdout", "output_type": "stream", "text": "%s"}],\n'
            '   "source": "print(1)", "zz": [{"q": 1,\n   "source": "# /// script\\n# ///"\n  },\n  {}]\n  }'
            % blob)
    path = tmp_path / "nb.ipynb"
    tail = '\n ],\n "metadata": {},\n "nbformat": 4,\n "nbformat_minor": 5\n}\n'
    path.write_text('{\n "cells": [\n' + cell + tail)
    assert nbdecl.read_declaration_full(path) is None
    assert nbdecl.read_declaration(path) == nbdecl.Declaration("# /// script\n# ///", 1)


def test_output_text_that_looks_like_the_metadata_key(tmp_path: Path) -> None:
    # In the file this text is escaped ("\\n"): only a raw newline starts a key of the layout.
    trap = '\n "metadata": {\n  "uv.lock": "fake"\n },\n "nbformat": 4,\n "nbformat_minor": 5\n}\n'
    nb = notebook([code("print(1)", [text_output(trap)]), code("z", [text_output(trap)])],
                  {"runt": {"uv": {"dependencies": ["toolz"]}}})
    found = assert_fast_path_equals_full_parse(save(tmp_path / "nb.ipynb", nb))
    assert found is not None and found.lock is None and found.uv == {"dependencies": ["toolz"]}
    # The same trap as the tail of the last cell's source, right before the real metadata.
    nb.cells.append(nbformat.v4.new_markdown_cell(trap + '\n ],' + trap))
    assert assert_fast_path_equals_full_parse(save(tmp_path / "nb2.ipynb", nb)) == found


def test_crlf_line_endings_take_the_fast_path(tmp_path: Path) -> None:
    nb = notebook([nbformat.v4.new_markdown_cell("a\nb"), code(SCRIPT)], {"uv.lock": LOCK})
    path = tmp_path / "crlf.ipynb"
    path.write_bytes(nbformat.writes(nb).replace("\n", "\r\n").encode() + b"\r\n")
    found = assert_fast_path_equals_full_parse(path)
    assert found is not None and found.script == SCRIPT and found.lock == LOCK


def layouts(nb: dict[str, Any]) -> dict[str, bytes]:
    """The same notebook in layouts Jupyter does not write: the full parse reads them."""
    cells_last = {"metadata": nb["metadata"], "nbformat": 4, "nbformat_minor": 5, "cells": nb["cells"]}
    return {
        "minified": json.dumps(nb, separators=(",", ":")).encode(),
        "unsorted": json.dumps(cells_last, indent=1).encode(),
        "indent2": json.dumps(nb, indent=2, sort_keys=True).encode(),
        "extra_key": json.dumps(dict(nb, zzz=1), indent=1, sort_keys=True).encode(),
        "tabs": json.dumps(nb, indent="\t", sort_keys=True).encode(),
        "ascii_escaped": json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=True).encode(),
    }


def colab(nb: nbformat.NotebookNode) -> bytes:
    """The notebook as Colab saves it: indent 2, "cells" last, in a cell "source" before "outputs"."""
    plain = json.loads(nbformat.writes(nb))
    order = ["cell_type", "source", "metadata", "execution_count", "outputs"]
    cells = [{key: cell[key] for key in sorted(cell, key=lambda k: order.index(k) if k in order else 9)}
             for cell in plain["cells"]]
    ordered = {"nbformat": 4, "nbformat_minor": 0, "metadata": plain["metadata"], "cells": cells}
    return json.dumps(ordered, indent=2, ensure_ascii=False).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("layout", ["colab", "unsorted", "indent2"])
def test_colab_and_indent_2_layouts_take_the_fast_path(tmp_path: Path, layout: str) -> None:
    metadata = {"uv.lock": LOCK, "runt": {"uv": {"dependencies": []}}}
    nb = notebook([nbformat.v4.new_markdown_cell("# A"), code(SCRIPT, [image_output(200_000)]),
                   code("x", [image_output(300_000)])], metadata)
    path = tmp_path / "nb.ipynb"
    path.write_bytes(colab(nb) if layout == "colab" else layouts(json.loads(nbformat.writes(nb)))[layout])
    found = assert_fast_path_equals_full_parse(path)
    assert found == nbdecl.Declaration(SCRIPT, 2, {"dependencies": []}, nbdecl.RUNT_UV_KEY, LOCK)


@pytest.mark.parametrize("layout", ["minified", "extra_key", "tabs"])
def test_other_layouts_fall_back_to_the_full_parse(tmp_path: Path, layout: str) -> None:
    nb = json.loads(nbformat.writes(notebook([code(SCRIPT)], {"uv.lock": LOCK})))
    path = tmp_path / "nb.ipynb"
    path.write_bytes(layouts(nb)[layout])
    assert_falls_back_with_the_same_result(path)
    assert nbdecl.read_declaration(path, small_file=0) == nbdecl.Declaration(SCRIPT, 1, lock=LOCK)


def test_ensure_ascii_escapes_are_the_same_layout(tmp_path: Path) -> None:
    nb = json.loads(nbformat.writes(notebook([code(SCRIPT + "\n# é ✓ 😀")], {"uv.lock": LOCK})))
    path = tmp_path / "nb.ipynb"
    path.write_bytes(layouts(nb)["ascii_escaped"])
    assert assert_fast_path_equals_full_parse(path) is not None


def broken_files(good: bytes) -> dict[str, bytes]:
    head_cut = good.index(b'"source"')
    return {
        "invalid_head": good.replace(b'"cell_type": "code"', b'"cell_type": code', 1),
        "invalid_tail": good[:-40] + b"!" + good[-39:],
        "truncated": good[: len(good) - 30],
        "truncated_in_the_first_cell": good[:head_cut],
        "bom": b"\xef\xbb\xbf" + good,
        "latin1_in_the_first_cell": good.replace(b"\xc3\xa9", b"\xe9", 1),
        "latin1_in_the_metadata": good[:-60] + b"\xe9" + good[-59:],
        "trailing_garbage": good + b"x",
        "leading_zero_nbformat": good.replace(b'"nbformat": 4', b'"nbformat": 04'),
        "empty": b"",
        "not_an_object": b"[1, 2, 3]",
    }


@pytest.mark.parametrize("layout", ["jupyter", "colab"])
@pytest.mark.parametrize("case", sorted(broken_files(b'"source" \xc3\xa9')))
def test_broken_files_give_the_full_parse_result(tmp_path: Path, case: str, layout: str) -> None:
    nb = notebook([code(SCRIPT + "\n# café")], {"uv.lock": LOCK + "# é" * 10})
    path = tmp_path / "nb.ipynb"
    good = nbformat.writes(nb).encode() if layout == "jupyter" else colab(nb)
    path.write_bytes(broken_files(good + b"\n")[case])
    expected = _outcome(nbdecl.read_declaration_full, path)
    for chunk in (1, 7, 64, 65536):
        assert _outcome(nbdecl.read_declaration, path, chunk=chunk, small_file=0) == expected
    assert isinstance(expected, tuple) and expected[0] == "unreadable", expected


def test_the_unread_middle_is_trusted(tmp_path: Path) -> None:
    # The price of reading head and tail only: damage between the first code cell and the
    # metadata is not seen (Jupyter itself would refuse to open that file).
    nb = notebook([code(SCRIPT), code("x", [text_output("z" * 400_000)]), code("y")], {"uv.lock": LOCK})
    good = nbformat.writes(nb).encode()
    path = tmp_path / "nb.ipynb"
    path.write_bytes(good.replace(b"zzzz", b'zz"z', 1))
    assert nbdecl.read_declaration(path) == nbdecl.Declaration(SCRIPT, 1, lock=LOCK)
    with pytest.raises(nbdecl.NotebookUnreadable):
        nbdecl.read_declaration_full(path)


def test_a_large_file_in_another_layout_is_not_parsed_whole(tmp_path: Path) -> None:
    # Parsing 2 GB would take ~40 s and 4 GB of memory at every kernel start.
    path = tmp_path / "big.ipynb"
    with open(path, "wb") as handle:
        handle.truncate(2 * 1024 ** 3)  # sparse: 2 GB of NUL bytes that take no disk
    started = time.monotonic()
    with pytest.raises(nbdecl.NotebookUnreadable, match=(
            r"^\S*big\.ipynb is 2147\.5 MB and not laid out as Jupyter or Colab save notebooks \(it starts "
            r"b'\\x00\\x00.*'\); a file above 16 MiB is read only in those layouts, so it declares nothing "
            r"here: open and save it in Jupyter to have its declaration read$")):
        nbdecl.read_declaration(path)
    assert time.monotonic() - started < 1
    # A minified notebook is parsed whole up to the limit, and not above it.
    nb = json.loads(nbformat.writes(notebook([code(SCRIPT, [image_output(200_000)])])))
    path.write_bytes(json.dumps(nb, separators=(",", ":")).encode())
    size = path.stat().st_size
    assert nbdecl.read_declaration(path, full_parse_limit=size) == nbdecl.Declaration(SCRIPT, 1)
    starts = r"it starts b'\{\"cells\":\[\{\"cell'\); a file above 0.19"
    with pytest.raises(nbdecl.NotebookUnreadable, match=starts):
        nbdecl.read_declaration(path, full_parse_limit=size - 1)


@pytest.mark.parametrize("target", ["missing", "directory", "fifo"])
def test_what_is_not_a_file_is_unreadable(tmp_path: Path, target: str) -> None:
    path = tmp_path / "x.ipynb"
    if target == "directory":
        path.mkdir()
    elif target == "fifo":
        os.mkfifo(path)  # must not block the kernel start
    with pytest.raises(nbdecl.NotebookUnreadable, match=r"cannot read .*x\.ipynb"):
        nbdecl.read_declaration(path)


# --- many generated notebooks --------------------------------------------------------------------

WORDS = ["# /// script", "# ///", "import x", "é", "✓", "😀", "\\", '"', "\n", "\r\n", "\t", " ", "{", "}",
         '\n "metadata": {', "\n  }", "\n ],", "\u2028", "\x00", "# dependencies = []"]


def random_text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randrange(words + 1)))


def random_cell(rng: random.Random) -> nbformat.NotebookNode:
    kind = rng.choice(["code", "code", "markdown", "raw"])
    block = rng.choice([SCRIPT, "# /// script\n# ///", ""]) if rng.random() < 0.4 else ""
    source = block + random_text(rng, 8)
    if kind == "markdown":
        return nbformat.v4.new_markdown_cell(source)
    if kind == "raw":
        return nbformat.v4.new_raw_cell(source)
    outputs = [text_output(random_text(rng, 30)) for _ in range(rng.randrange(3))]
    if rng.random() < 0.2:
        outputs.append(image_output(rng.randrange(1, 5000), rng.randrange(100)))
    return code(source, outputs, **({"jupyter": {"source_hidden": True}} if rng.random() < 0.3 else {}))


def random_metadata(rng: random.Random) -> dict[str, Any]:
    metadata: dict[str, Any] = {"kernelspec": {"name": "uv", "display_name": random_text(rng, 3) or "uv"}}
    uv = {"dependencies": [random_text(rng, 2)], "requires-python": ">=3.11"}
    choice = rng.randrange(5)
    if choice == 1:
        metadata["runt"] = {"schema_version": "1", "uv": uv}
    elif choice == 2:
        metadata["uv"] = uv
    elif choice == 3:
        metadata["runt"] = {"env_id": "x"}
        metadata["uv"] = [uv]
    if rng.random() < 0.4:
        metadata["uv.lock"] = rng.choice([LOCK, random_text(rng, 50), None, 3])
    if rng.random() < 0.2:
        metadata["zzz"] = {"metadata": random_text(rng, 5)}
    return metadata


@pytest.mark.parametrize("big_cell", [nbdecl.BIG_CELL, 0])  # 0: every first code cell is "big"
def test_fast_path_equals_full_parse_on_many_generated_notebooks(
        tmp_path: Path, monkeypatch: Any, big_cell: int) -> None:
    monkeypatch.setattr(nbdecl, "BIG_CELL", big_cell)
    rng = random.Random(11)
    taken = 0
    for number in range(300):
        nb = notebook([random_cell(rng) for _ in range(rng.randrange(6))], random_metadata(rng))
        path = tmp_path / ("%d.ipynb" % number)
        if rng.random() < 0.3:
            text = colab(nb).decode("utf-8", "surrogatepass")
        else:
            text = nbformat.writes(nb)
        text += rng.choice(["", "\n", "\n\n"])
        if rng.random() < 0.2:
            text = text.replace("\n", "\r\n")
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        expected = _outcome(nbdecl.read_declaration_full, path)
        chunk = rng.choice([1, 3, 16, 100, 1000, 65536])
        assert _outcome(nbdecl.read_declaration, path, chunk=chunk, small_file=0) == expected, (number, chunk)
        try:
            taken += fast(path, chunk) == expected
        except nbdecl._NotLaidOut:
            pass
    assert taken == 300  # every file nbformat (or the Colab layout) wrote took the fast path
