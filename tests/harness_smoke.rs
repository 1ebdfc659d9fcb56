mod support;

#[test]
fn throwaway_cluster_has_logical_wal() {
    let pg = support::pg::TestPg::start();
    assert_eq!(pg.sql("show wal_level").trim(), "logical");
}
