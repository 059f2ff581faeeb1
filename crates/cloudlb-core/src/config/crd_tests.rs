//! The committed CRD YAML must be what the code generates (`cloudlb crdgen`).

use super::class::LoadBalancerClass;
use kube::CustomResourceExt;

#[test]
fn committed_crd_is_current() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crds/loadbalancerclasses.cloudlb.io.yaml"
    );
    let generated = serde_saphyr::to_string(&LoadBalancerClass::crd()).expect("crd yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &generated).expect("write crd");
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "{path} is stale: run `cargo run -- crdgen > crds/loadbalancerclasses.cloudlb.io.yaml` (or UPDATE_GOLDEN=1 cargo test -p cloudlb-core crd)"
    );
}
