"""pipeline/storage.py on a local folder and on a real S3 server (moto)."""

import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_server")
    return f"s3://inkseed-test/storage-{request.node.name.replace('[', '-').rstrip(']')}"


def test_write_read_list_delete(root):
    storage.check_writable(root)
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_bytes(storage.join(root, "a", "y.txt"), b"world")
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"hello"
    assert storage.exists(storage.join(root, "a", "y.txt"))
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(root, "a"))] == ["x.bin", "y.txt"]
    assert storage.list_files(storage.join(root, "a"), ".txt") == [storage.join(root, "a", "y.txt")]
    storage.delete_dir(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "x.bin"))


def test_missing_file_is_a_clear_error(root):
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(storage.join(root, "nope.bin"))


def test_unwritable_output_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(storage.StorageError, match="not writable"):
        storage.check_writable(str(blocker / "sub"))


def test_ray_workers_see_s3(ray_local):
    @ray_local.remote
    def read(uri):
        return storage.read_bytes(uri)

    uri = "s3://inkseed-test/storage-ray/hello.txt"
    storage.write_bytes(uri, b"from the driver")
    assert ray_local.get(read.remote(uri)) == b"from the driver"


def test_compare_and_swap_is_atomic(root):
    """Four threads add 1 twenty times each through compare_and_swap: no increment is lost."""
    import threading

    uri = storage.join(root, "counter")

    def add() -> None:
        for _ in range(20):
            storage.compare_and_swap(uri, lambda cur: str(int(cur or b"0") + 1).encode())

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.read_bytes(uri) == b"80"
    storage.compare_and_swap(uri, lambda cur: storage.KEEP)
    assert storage.read_bytes(uri) == b"80"
    storage.compare_and_swap(uri, lambda cur: storage.DELETE)
    assert not storage.exists(uri)


def test_s3_errors_name_the_uri(s3_server):
    with pytest.raises(storage.StorageError, match=r"write s3://inkseed-no-bucket/x: .*bucket does not exist.*AWS_ENDPOINT_URL"):
        storage.write_bytes("s3://inkseed-no-bucket/x", b"1")
    with pytest.raises(storage.StorageError, match=r"not writable: .*bucket does not exist"):
        storage.check_writable("s3://inkseed-no-bucket/out")


def test_temp_files_of_killed_writes_are_swept(tmp_path):
    folder = tmp_path / "images"
    storage.write_bytes(str(folder / "1.png"), b"png", durable=True)
    (folder / ".2.png.0123456789ab.tmp").write_bytes(b"half a png")  # what a SIGKILL mid-write leaves
    (folder / ".keep").write_bytes(b"not ours")
    assert storage.remove_temp_files(str(folder)) == 1
    assert sorted(p.name for p in folder.iterdir()) == [".keep", "1.png"]
    assert storage.remove_temp_files("s3://inkseed-test/none") == 0
