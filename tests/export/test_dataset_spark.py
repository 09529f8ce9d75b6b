"""The fleet queries of docs/timeline.md on Apache Spark (pyspark, local mode) and on
DuckDB, over the same dataset of real sessions (tests/support/fleetsessions.py): the results
must be equal.

Equal means equal values row by row, in the order the queries' ORDER BY fixes (every
ORDER BY there is a total order). The one exception is ``p99_interp_ns``
(``percentile_cont``): both engines define it the same way (linear interpolation at
(n-1) x p), but each does the interpolation in its own double arithmetic, so it is
compared to 1e-12 relative (docs/timeline.md). ``p99_ns`` (``percentile_disc``) is
compared exactly.

One SparkSession for the module, ``local[2]`` with two shuffle partitions and no UI,
so Spark's start-up (JVM, ~15 s on this machine) is paid once.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest

import fleetsessions
from fleetsessions import doc_queries
from vmtrace import cli
from vmtrace.export import dataset as D

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle, pytest.mark.slow]
INTERPOLATED = {"p99_interp_ns"}


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    pyspark = pytest.importorskip("pyspark", reason="pyspark is a dev dependency: pip install -e '.[dev]'")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs Java: apt-get install openjdk-17-jre-headless (scripts/install-deps.sh)")
    from pyspark.sql import SparkSession
    work = tmp_path_factory.mktemp("spark")
    s = (SparkSession.builder.master("local[2]").appName("vmtrace-test")
         .config("spark.sql.shuffle.partitions", "2")
         .config("spark.default.parallelism", "2")
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false")
         .config("spark.driver.memory", "512m")
         .config("spark.sql.session.timeZone", "UTC")
         .config("spark.sql.warehouse.dir", str(work / "warehouse"))
         .config("spark.local.dir", str(work / "local"))
         # partition values stay text, as in DuckDB (docs/timeline.md)
         .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    assert pyspark.__version__
    yield s
    s.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    fleet = fleetsessions.fleet(tmp_path_factory.getbasetemp() / "fleet")
    root = tmp_path_factory.mktemp("ds-spark") / "fleet"
    assert cli.main(["export", *map(str, fleet.values()), "--dataset", str(root), "-q"]) == 0
    return root


@pytest.fixture(scope="module")
def engines(spark, dataset):
    ev = spark.read.option("basePath", str(dataset)).parquet(D.parquet_glob(str(dataset)))
    ev.createOrReplaceTempView("events")
    for name, sql in D.VIEWS.items():
        spark.sql("CREATE OR REPLACE TEMPORARY VIEW %s AS %s" % (name, sql))
    return spark, D.duckdb_connect(str(dataset))


def _spark_rows(spark, q):
    df = spark.sql(q)
    return df.columns, [tuple(r) for r in df.collect()]


def _duck_rows(con, q):
    cur = con.execute(q)
    return [d[0] for d in cur.description], cur.fetchall()


def _same(cols, a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for c, x, y in zip(cols, ra, rb):
            if c in INTERPOLATED:
                assert math.isclose(x, y, rel_tol=1e-12), (c, ra, rb)
            else:
                assert x == y and (x is None) == (y is None), (c, ra, rb)


@pytest.mark.parametrize("title", sorted(doc_queries()))
def test_same_sql_same_result(engines, title):
    spark, con = engines
    q = doc_queries()[title]
    cols_s, rows_s = _spark_rows(spark, q)
    cols_d, rows_d = _duck_rows(con, q)
    assert cols_s == cols_d
    assert rows_d, "the query found nothing in the test data: %s" % title
    _same(cols_d, rows_d, rows_s)


def test_the_test_data_spans_hosts_guests_and_loss(engines):
    """What the comparisons above are worth: two hosts, several guests, a real drop."""
    spark, con = engines
    per = _spark_rows(spark, doc_queries()["events per guest and CPU"])[1]
    assert {r[0] for r in per} == {"hv1", "hv2"} and len({(r[0], r[1]) for r in per}) == 6
    lost = _spark_rows(spark, doc_queries()["lost events per host"])[1]
    assert [r[0] for r in lost] == ["hv2"] and lost[0][1] >= 1
    p99 = _spark_rows(spark, doc_queries()["99th percentile of wake-up latency per guest"])[1]
    assert len(p99) == 6 and all(r[2] > 0 for r in p99)


def test_views_and_partition_pruning(engines):
    spark, con = engines
    q = "SELECT guest, count(*) AS n FROM sched_switch WHERE host = 'hv2' GROUP BY guest ORDER BY guest"
    assert _spark_rows(spark, q)[1] == _duck_rows(con, q)[1]
    plan = spark.sql(q)._jdf.queryExecution().executedPlan().toString()
    assert "PartitionFilters: [" in plan and "hv2" in plan.split("PartitionFilters: [", 1)[1].split("]", 1)[0]
