//! The checkpoint (`state.cloudlb.io/checkpoint`) against every AWS model of the build goldens:
//! what it gives back plans to nothing (it is the model as applied), it encodes to itself, and
//! anything that does not fit the model exactly is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use cloudlb_core::model::Desired;
use cloudlb_core::model::checkpoint::{Unusable, encode, outline};
use cloudlb_core::model::observed::Observed;
use cloudlb_core::plan::plan_with_backend;
use serde_json::{Value, json};
use std::path::Path;

const PREFIX: &str = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:";
/// The cluster's backend security group.
const BACKEND: &str = "sg-0backend000000000";

/// The AWS models of the build goldens (those that build a load balancer).
fn models() -> Vec<(String, Desired)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/build");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("golden dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let case: Value = serde_json::from_str(&text).expect("json");
        let Some(desired) = case.get("desired") else {
            continue;
        };
        let desired: Desired = serde_json::from_value(desired.clone()).expect("a Desired");
        if desired.lb.as_ref().is_some_and(|lb| lb.local.is_none()) {
            out.push((path.display().to_string(), desired));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 10,
        "expected the AWS models of the build goldens"
    );
    out
}

/// A checkpoint of `desired` as cloudlb would write it after applying it (ids made up).
fn checkpoint_of(desired: &Desired) -> Value {
    let lb = desired.lb.as_ref().expect("lb");
    let listeners: serde_json::Map<String, Value> = lb
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (l.port.to_string(), json!(format!("{i:016x}"))))
        .collect();
    let groups: serde_json::Map<String, Value> = lb
        .target_groups
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), json!(format!("{:016x}", 100 + i))))
        .collect();
    let mut v = json!({
        "v": 1,
        "m": desired.fingerprint(),
        "p": PREFIX,
        "lb": format!("net/{}/0123456789abcdef", desired.lb_name),
        "dns": format!("{}-0123456789abcdef.elb.eu-west-1.amazonaws.com", desired.lb_name),
        "l": listeners,
        "tg": groups,
    });
    if lb.security.frontend.is_some() {
        v["sg"] = json!("sg-0123456789abcdef0");
    }
    let others: Vec<&str> = lb
        .security
        .backend
        .iter()
        .map(|_| BACKEND)
        .chain(lb.security.extra_security_groups.iter().map(String::as_str))
        .collect();
    if !others.is_empty() {
        v["g"] = json!(others);
    }
    v
}

#[test]
fn the_outline_of_a_checkpoint_is_the_model_as_applied() {
    for (case, desired) in models() {
        let value = checkpoint_of(&desired).to_string();
        let fp = desired.fingerprint();
        let outline = outline(&value, &desired, &fp).unwrap_or_else(|e| panic!("{case}: {e}"));
        let ops = plan_with_backend(&desired, &outline, Some(BACKEND))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(ops.is_empty(), "{case}: plans {:?}", ops.ops);
        let encoded = encode(&fp, &outline).unwrap_or_else(|| panic!("{case}: no checkpoint"));
        assert_eq!(
            serde_json::from_str::<Value>(&encoded).expect("JSON"),
            checkpoint_of(&desired),
            "{case}: encodes back to itself"
        );
        let lb = outline.lb.as_ref().expect("lb");
        assert_eq!(
            lb.arn,
            format!(
                "{PREFIX}loadbalancer/net/{}/0123456789abcdef",
                desired.lb_name
            )
        );
        for l in &outline.listeners {
            assert!(
                l.arn
                    .starts_with(&format!("{PREFIX}listener/net/{}/", desired.lb_name)),
                "{case}: {}",
                l.arn
            );
        }
    }
}

#[test]
fn a_checkpoint_that_does_not_fit_the_model_is_refused() {
    let (_, desired) = models().into_iter().next().expect("a model");
    let fp = desired.fingerprint();
    let good = checkpoint_of(&desired);
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v.to_string()
    };
    let malformed = |r: Result<Observed, Unusable>| matches!(r, Err(Unusable::Malformed(_)));
    let mismatch = |r: Result<Observed, Unusable>| matches!(r, Err(Unusable::Mismatch(_)));
    type Refused<'a> = &'a dyn Fn(Result<Observed, Unusable>) -> bool;
    let cases: Vec<(&str, String, Refused)> = vec![
        ("garbage", "{not json".into(), &malformed),
        ("empty", String::new(), &malformed),
        ("another version", edit(&|v| v["v"] = json!(2)), &malformed),
        ("an unknown field", edit(&|v| v["x"] = json!(1)), &malformed),
        (
            "another model",
            edit(&|v| v["m"] = json!("0".repeat(32))),
            &|r| r == Err(Unusable::ModelChanged),
        ),
        (
            "another load balancer's name",
            edit(&|v| v["lb"] = json!("net/someone-else/0123456789abcdef")),
            &mismatch,
        ),
        (
            "no kind in the id",
            edit(&|v| v["lb"] = json!(format!("{}/0123", desired.lb_name))),
            &malformed,
        ),
        (
            "an id with a path in it",
            edit(&|v| v["lb"] = json!(format!("net/{}/../../targetgroup/x", desired.lb_name))),
            &malformed,
        ),
        (
            "a listener too few",
            edit(&|v| {
                let l = v["l"].as_object_mut().expect("l");
                let first = l.keys().next().cloned().expect("a listener");
                l.remove(&first);
            }),
            &mismatch,
        ),
        (
            "a target group of another name",
            edit(&|v| {
                let t = v["tg"].as_object_mut().expect("tg");
                let first = t.keys().next().cloned().expect("a target group");
                let id = t.remove(&first).expect("id");
                t.insert("k8s-other-name".into(), id);
            }),
            &mismatch,
        ),
        (
            "an ARN prefix of another service",
            edit(&|v| v["p"] = json!("arn:aws:ec2:eu-west-1:123456789012:x/")),
            &malformed,
        ),
        ("no address", edit(&|v| v["dns"] = json!("")), &malformed),
        (
            "a security group the model does not make",
            edit(&|v| {
                if v.get("sg").is_some() {
                    v.as_object_mut().expect("object").remove("sg");
                } else {
                    v["sg"] = json!("sg-0123");
                }
            }),
            &mismatch,
        ),
    ];
    for (name, value, refused) in cases {
        let r = outline(&value, &desired, &fp);
        assert!(refused(r.clone()), "{name}: {r:?}");
    }
    assert!(outline(&good.to_string(), &desired, &fp).is_ok());
}

#[test]
fn nothing_to_checkpoint_without_an_active_load_balancer() {
    let (_, desired) = models().into_iter().next().expect("a model");
    let fp = desired.fingerprint();
    let value = checkpoint_of(&desired).to_string();
    let mut o = outline(&value, &desired, &fp).expect("outline");
    let lb = o.lb.as_mut().expect("lb");
    lb.state = cloudlb_core::model::observed::LbState::Provisioning;
    assert_eq!(encode(&fp, &o), None, "provisioning");
    o.lb = None;
    assert_eq!(encode(&fp, &o), None, "no load balancer");
    let mut o = outline(&value, &desired, &fp).expect("outline");
    o.target_groups[0].arn = "arn:aws:elasticloadbalancing:x:y:targetgroup-weird".into();
    assert_eq!(encode(&fp, &o), None, "an ARN of an unknown form");
}

#[test]
fn only_a_change_of_targets_is_told_apart() {
    use cloudlb_core::model::Target;
    use cloudlb_core::model::checkpoint::only_targets_differ;
    for (case, desired) in models() {
        let fp = desired.fingerprint();
        let value = checkpoint_of(&desired).to_string();
        let remembered = outline(&value, &desired, &fp).expect("outline");
        assert!(
            only_targets_differ(&desired, &fp, &remembered),
            "{case}: the same model"
        );

        let mut more = desired.clone();
        let lb = more.lb.as_mut().expect("lb");
        lb.target_groups[0].targets.insert(Target {
            id: "i-0new".into(),
            port: 30999,
        });
        assert!(
            only_targets_differ(&more, &fp, &remembered),
            "{case}: a target more"
        );

        let mut other = more.clone();
        let lb = other.lb.as_mut().expect("lb");
        lb.target_groups[0].health_check.interval_seconds += 5;
        assert!(
            !only_targets_differ(&other, &fp, &remembered),
            "{case}: a health check"
        );

        let mut renamed = more.clone();
        renamed.lb.as_mut().expect("lb").target_groups[0].name = "k8s-other".into();
        assert!(
            !only_targets_differ(&renamed, &fp, &remembered),
            "{case}: a target group"
        );
    }
}
