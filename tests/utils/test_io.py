"""Atomic writes: a result appears complete under its final name or not at all, whatever interrupts the writer."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from utils.errors import UserError
from utils.io import atomic_path, ensure_writable_dir, read_json_object, write_text_atomic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def umask_002():
    # A umask other than the common 022 shows that modes come from the umask and not from a constant.
    previous = os.umask(0o002)
    yield
    os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_replaces_the_content_and_leaves_only_the_file(tmp_path, umask_002):
    path = tmp_path / "sub" / "out.json"
    write_text_atomic(str(path), "old\n")
    write_text_atomic(str(path), "new ✓\n")
    assert path.read_text(encoding="utf-8") == "new ✓\n"
    assert os.listdir(path.parent) == ["out.json"]
    assert mode(path) == 0o664  # what open() would give under this umask, not the temporary file's 0600


def test_interrupted_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    write_text_atomic(str(path), "old\n")

    def interrupted(fd):
        raise KeyboardInterrupt  # Ctrl-C after the new text went to disk, before the rename

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(str(path), "new\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.json"]


def test_the_temporary_is_hidden_beside_the_target(tmp_path):
    with atomic_path(str(tmp_path / "out.json")) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # same file system, so the rename is atomic
        name = os.path.basename(tmp)
        assert name.startswith(".out.json.") and name.endswith(".tmp") and not os.path.exists(tmp)
        open(tmp, "w").close()


def test_a_file_never_replaces_a_directory(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(OSError):
        with atomic_path(str(tmp_path / "model")) as tmp:
            open(tmp, "w").close()
    assert (tmp_path / "model").is_dir() and os.listdir(tmp_path) == ["model"]


def test_text_is_utf8_whatever_the_locale(tmp_path):
    # the command itself is ASCII: under the C locale a non-ASCII argument would not even reach Python
    code = ("import sys; from utils.io import write_text_atomic, read_json_object; text = 'caf' + chr(233) + ' ' + chr(10003); "
            "write_text_atomic(sys.argv[1], '{\"caption\": \"' + text + '\"}'); print(read_json_object(sys.argv[1], 'x')['caption'] == text)")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.json")], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"
    assert (tmp_path / "c.json").read_bytes() == '{"caption": "café ✓"}'.encode("utf-8")


def test_text_files_are_utf8_under_an_ascii_default_encoding(tmp_path, monkeypatch):
    # In process (so mutation testing sees it): `open` without an encoding behaves as under the C locale.
    import builtins

    import utils.io

    def c_locale_open(file, mode="r", *args, encoding=None, **kwargs):
        if "b" not in mode and encoding is None:
            encoding = "ascii"
        return builtins.open(file, mode, *args, encoding=encoding, **kwargs)

    monkeypatch.setattr(utils.io, "open", c_locale_open, raising=False)
    path = tmp_path / "caption.json"
    write_text_atomic(str(path), '{"caption": "café ✓"}')
    assert path.read_bytes() == '{"caption": "café ✓"}'.encode("utf-8")
    assert read_json_object(str(path), "caption file") == {"caption": "café ✓"}


def test_interrupted_block_keeps_the_old_file_and_the_old_directory(tmp_path):
    file_path, dir_path = tmp_path / "weights.bin", tmp_path / "model"
    file_path.write_bytes(b"complete")
    dir_path.mkdir()
    (dir_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_path(str(file_path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        with atomic_path(str(dir_path)) as tmp:
            os.mkdir(tmp)
            open(os.path.join(tmp, "weights.bin"), "wb").close()
            raise RuntimeError("disk full")
    assert file_path.read_bytes() == b"complete"
    assert os.listdir(dir_path) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == ["model", "weights.bin"]


def test_directory_replaces_an_existing_one_whole(tmp_path, umask_002):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    with atomic_path(str(target)) as tmp:
        os.makedirs(os.path.join(tmp, "vae"))
        with open(os.path.join(tmp, "vae", "config.json"), "w") as f:
            f.write("{}")
        os.chmod(tmp, 0o700)  # e.g. made by tempfile.mkdtemp
    assert os.listdir(target) == ["vae"] and (target / "vae" / "config.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["model"]
    assert (mode(target), mode(target / "vae"), mode(target / "vae" / "config.json")) == (0o775, 0o775, 0o664)


KILL_LOOP = """
import sys
from utils.io import write_text_atomic
print("ready", flush=True)
i = 0
while True:
    write_text_atomic(sys.argv[1], ("ab"[i % 2] * 400000) + "end")
    i += 1
"""


def test_kill_at_any_moment_leaves_a_complete_file(tmp_path):
    path = tmp_path / "out.txt"
    for delay in (0.05, 0.2, 0.45):
        process = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "ready\n"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        if path.exists():
            assert path.read_text() in ("a" * 400000 + "end", "b" * 400000 + "end")
    assert path.exists()
    # a kill -9 can leave only hidden temporaries, never another name a reader could take for the result
    assert all(name == "out.txt" or (name.startswith(".out.txt.") and name.endswith(".tmp")) for name in os.listdir(tmp_path))


def test_read_json_object_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(UserError, match=r"config.json: --config file not found"):
        read_json_object(str(path), "--config file")
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"config.json: --config file is not valid JSON \(Expecting"):
        read_json_object(str(path), "--config file")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_json_object(str(path), "--config file")
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match=r"config.json: --config file must be a JSON object$"):
        read_json_object(str(path), "--config file")
    path.write_text('{"seed": 3}')
    assert read_json_object(str(path), "--config file") == {"seed": 3}


def test_ensure_writable_dir_creates_or_explains(tmp_path):
    ensure_writable_dir(str(tmp_path / "a" / "b"), "--save-dir")
    ensure_writable_dir(str(tmp_path / "a" / "b"), "--save-dir")  # an existing directory is fine
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^--save-dir .*file/out: cannot create it \(.*\); choose a writable directory$"):
        ensure_writable_dir(str(tmp_path / "file" / "out"), "--save-dir")
    # os.access stands in for a read-only directory: root, which runs CI, may write anywhere
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: False if path == str(locked) else real_access(path, mode))
        with pytest.raises(UserError, match=r"^--save-dir .*locked: not writable; choose a writable directory$"):
            ensure_writable_dir(str(locked), "--save-dir")
