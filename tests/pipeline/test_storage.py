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
