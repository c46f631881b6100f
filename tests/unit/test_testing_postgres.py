"""The tests' PostgreSQL server keeps its dynamic shared memory inside its own cluster directory:
a server that a test kills (or stops with ``immediate``) leaves no ``PostgreSQL.*`` segment in
``/dev/shm`` behind, since the whole directory goes when the server is closed."""

from __future__ import annotations


def test_dynamic_shared_memory_lives_in_the_cluster_directory(postgres_server):
    with postgres_server.admin() as conn:
        assert conn.execute("SHOW dynamic_shared_memory_type").fetchone()[0] == "mmap"
    assert any((postgres_server.data_dir / "pg_dynshmem").iterdir())
