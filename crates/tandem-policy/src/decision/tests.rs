//! The policy on hand-made views.
use super::*;

fn view() -> View {
    View {
        local: LocalView {
            available: true,
            model: "small".into(),
            context_length: 4096,
            capacity: 4,
            prefill_tps: Some(200.0),
            decode_tps: Some(60.0),
            ..LocalView::default()
        },
        cloud: Some(CloudView {
            name: "cloud".into(),
            model: "big".into(),
            available: true,
            price_input_per_mtok: 1.0,
            price_output_per_mtok: 2.0,
            ttft_ms: Some(300.0),
            ..CloudView::default()
        }),
        ..View::default()
    }
}

fn cfg() -> PolicyConfig {
    PolicyConfig::default()
}

#[test]
fn local_first_by_default_with_cloud_fallback() {
    let d = decide(&Features::default(), &view(), &cfg()).unwrap();
    assert_eq!(d.side, Locality::Local);
    assert_eq!(d.fallback, Some(Locality::Cloud));
    assert_eq!(d.decided_by, "prefer_local");
}

#[test]
fn strict_privacy_keeps_pii_home_even_when_device_prefers_cloud() {
    let mut v = view();
    v.device.battery_pct = Some(5.0);
    v.device.charging = Some(false);
    let f = Features {
        privacy: Some(PrivacyMode::Strict),
        pii: [("email".to_owned(), 1)].into(),
        ..Features::default()
    };
    let d = decide(&f, &v, &cfg()).unwrap();
    assert_eq!(d.side, Locality::Local);
    assert_eq!(d.fallback, None);
    assert!(
        d.reasons
            .iter()
            .any(|r| r.rule == "privacy" && r.effect == Effect::Forbid)
    );
    // Without PII the battery sends it out.
    let d = decide(&Features::default(), &v, &cfg()).unwrap();
    assert_eq!(d.side, Locality::Cloud);
    assert_eq!(d.decided_by, "device");
}

#[test]
fn redact_mode_allows_cloud_with_placeholders() {
    let mut v = view();
    v.local.context_length = 100;
    let f = Features {
        privacy: Some(PrivacyMode::Redact),
        pii: [("phone".to_owned(), 1)].into(),
        prompt_tokens: 500,
        ..Features::default()
    };
    let d = decide(&f, &v, &cfg()).unwrap();
    assert_eq!(
        (d.side, d.redact, d.fallback),
        (Locality::Cloud, true, None)
    );
}

#[test]
fn too_long_and_private_is_refused_with_reasons() {
    let mut v = view();
    v.local.context_length = 100;
    let f = Features {
        privacy: Some(PrivacyMode::Strict),
        pii: [("iban".to_owned(), 1)].into(),
        prompt_tokens: 500,
        ..Features::default()
    };
    let r = decide(&f, &v, &cfg()).unwrap_err();
    assert_eq!(r.kind, RefusalKind::Privacy);
    assert!(
        r.message().contains("iban") && r.message().contains("exceeds"),
        "{}",
        r.message()
    );
}

#[test]
fn offline_budget_and_saturation() {
    let mut v = view();
    v.cloud.as_mut().unwrap().available = false;
    let d = decide(&Features::default(), &v, &cfg()).unwrap();
    assert_eq!((d.side, d.fallback), (Locality::Local, None));

    let mut v = view();
    v.spend.budget_usd = Some(1.0);
    v.spend.today_usd = 1.5;
    v.local.active = 4;
    v.local.queued = 9;
    let d = decide(&Features::default(), &v, &cfg()).unwrap();
    assert_eq!(
        d.side,
        Locality::Local,
        "budget forbids the cloud the load would prefer"
    );
    assert!(d.reasons.iter().any(|r| r.rule == "budget"));

    let mut v = view();
    v.local.active = 4;
    v.local.queued = 9;
    let d = decide(&Features::default(), &v, &cfg()).unwrap();
    assert_eq!((d.side, d.decided_by), (Locality::Cloud, "load"));
}

#[test]
fn latency_goal_and_named_models() {
    let f = Features {
        prompt_tokens: 2000,
        latency_goal_ms: Some(1000),
        ..Features::default()
    };
    let d = decide(&f, &view(), &cfg()).unwrap();
    assert_eq!((d.side, d.decided_by), (Locality::Cloud, "latency"));

    let f = Features {
        named: Some(Locality::Cloud),
        ..Features::default()
    };
    let d = decide(&f, &view(), &cfg()).unwrap();
    assert_eq!((d.side, d.fallback), (Locality::Cloud, None));
    let f = Features {
        named: Some(Locality::Cloud),
        privacy: Some(PrivacyMode::Strict),
        pii: [("email".to_owned(), 1)].into(),
        ..Features::default()
    };
    assert_eq!(
        decide(&f, &view(), &cfg()).unwrap_err().kind,
        RefusalKind::Privacy
    );
}

#[test]
fn rule_order_sets_priority_of_preferences() {
    let mut v = view();
    v.device.battery_pct = Some(5.0);
    v.device.charging = Some(false);
    let mut c = cfg();
    c.rules = vec![Rule::PreferLocal, Rule::Device];
    assert_eq!(
        decide(&Features::default(), &v, &c).unwrap().side,
        Locality::Local
    );
    c.rules = vec![Rule::Device, Rule::PreferLocal];
    assert_eq!(
        decide(&Features::default(), &v, &c).unwrap().side,
        Locality::Cloud
    );
}

#[test]
fn quality_knob_moves_the_threshold() {
    assert_eq!(threshold_for_quality(0.4, 0.5), 0.4);
    assert_eq!(threshold_for_quality(0.4, 1.0), 0.0);
    assert!((threshold_for_quality(0.4, 0.0) - 1.0).abs() < 1e-6);
    assert!(threshold_for_quality(0.4, 0.75) < 0.4);
}

#[test]
fn capability_forbids_the_side_that_lacks_a_feature() {
    use tandem_api::{Capabilities, Feature};
    let mut v = view();
    v.local.capabilities = Capabilities::of([Feature::Chat]);
    if let Some(c) = v.cloud.as_mut() {
        c.capabilities = Capabilities::of([Feature::Chat, Feature::Tools]);
    }
    let f = Features {
        needs: vec![Feature::Chat, Feature::Tools],
        ..Features::default()
    };
    let d = decide(&f, &v, &cfg()).unwrap();
    assert_eq!((d.side, d.fallback), (Locality::Cloud, None));
    assert!(d.reasons.iter().any(|r| r.detail.contains("tool calling")));
    if let Some(c) = v.cloud.as_mut() {
        c.capabilities = Capabilities::of([Feature::Chat]);
    }
    assert_eq!(
        decide(&f, &v, &cfg()).unwrap_err().kind,
        RefusalKind::NoBackend
    );
}

#[test]
fn capability_forbids_the_local_side_where_its_grammar_cannot_enforce_a_schema() {
    use tandem_api::{Capabilities, Feature};
    let mut v = view();
    v.local.capabilities = Capabilities::of([Feature::Chat, Feature::JsonSchema]);
    if let Some(c) = v.cloud.as_mut() {
        c.capabilities = Capabilities::of([Feature::Chat, Feature::JsonSchema]);
    }
    let mut f = Features {
        needs: vec![Feature::Chat, Feature::JsonSchema],
        ..Features::default()
    };
    assert_eq!(decide(&f, &v, &cfg()).unwrap().side, Locality::Local);
    f.local_refuses = Some("Unimplemented keys: [\"uniqueItems\"]".into());
    let d = decide(&f, &v, &cfg()).unwrap();
    assert_eq!((d.side, d.fallback), (Locality::Cloud, None));
    assert!(
        d.reasons
            .iter()
            .any(|r| r.detail.contains("cannot enforce it") && r.detail.contains("uniqueItems")),
        "{:?}",
        d.reasons
    );
    // With no cloud to take it, the request is refused, not answered
    // without the schema.
    v.cloud = None;
    assert!(decide(&f, &v, &cfg()).is_err());
}

#[test]
fn privacy_holds_when_the_rules_leave_it_out_or_the_detector_cannot_run() {
    let mut c = cfg();
    c.rules = vec![Rule::PreferCloud];
    let f = Features {
        privacy: Some(PrivacyMode::Strict),
        pii: [("email".to_owned(), 2)].into(),
        ..Features::default()
    };
    let d = decide(&f, &view(), &c).unwrap();
    assert_eq!(d.side, Locality::Local);
    assert!(d.reasons.iter().any(|r| r.detail.contains("email ×2")));
    for mode in [PrivacyMode::Strict, PrivacyMode::Redact] {
        let f = Features {
            privacy: Some(mode),
            pii_unchecked: Some("the model is missing".into()),
            ..Features::default()
        };
        let d = decide(&f, &view(), &c).unwrap();
        assert_eq!((d.side, d.fallback), (Locality::Local, None), "{mode:?}");
    }
    let f = Features {
        privacy: Some(PrivacyMode::Off),
        pii_unchecked: Some("the model is missing".into()),
        ..Features::default()
    };
    assert_eq!(decide(&f, &view(), &c).unwrap().side, Locality::Cloud);
}

#[test]
fn a_busy_device_does_not_send_to_a_cloud_on_the_same_machine() {
    let mut v = view();
    v.device.cpu_load = Some(1.9);
    v.device.cores = Some(2);
    let d = decide(&Features::default(), &v, &cfg()).unwrap();
    assert_eq!(d.side, Locality::Cloud);
    assert_eq!(d.decided_by, "device");
    assert!(d.reasons.iter().any(|r| r.detail.contains("cores busy")));
    // The same upstream on loopback: sending there would keep the same
    // cores busy (and feed the load that sent it), so the device stays.
    if let Some(c) = v.cloud.as_mut() {
        c.on_this_machine = true;
    }
    let d = decide(&Features::default(), &v, &cfg()).unwrap();
    assert_eq!(d.side, Locality::Local);
    assert!(d.reasons.iter().all(|r| r.rule != "device"), "{d:?}");
    // A low battery still counts (overridden signals, as in a demo).
    v.device.battery_pct = Some(5.0);
    v.device.charging = Some(false);
    let d = decide(&Features::default(), &v, &cfg()).unwrap();
    assert_eq!(d.side, Locality::Cloud);
    assert!(d.reasons.iter().all(|r| !r.detail.contains("cores busy")));
}

#[test]
fn a_difficulty_span_matters_only_where_the_difficulty_rule_decides() {
    let scored = |d: f32, t: f32| Features {
        difficulty: Some(d),
        difficulty_threshold: Some(t),
        ..Features::default()
    };
    let c = cfg();
    let can = |f: &Features, v: &View, lo: f32, hi: f32| difficulty_can_change(f, v, &c, lo, hi);
    // Across the threshold in force, and only there.
    let f = scored(0.5, 0.5);
    assert!(can(&f, &view(), 0.45, 0.55));
    assert!(can(&f, &view(), 0.3, 0.5), "the threshold itself goes out");
    assert!(!can(&f, &view(), 0.1, 0.45));
    assert!(!can(&f, &view(), 0.5, 0.9));
    // The threshold in force is the request's (a held cut, say), not a
    // calibrated one elsewhere.
    let held = scored(0.5, 0.8);
    assert!(!can(&held, &view(), 0.45, 0.55));
    assert!(can(&held, &view(), 0.75, 0.85));
    // Without one, the policy's for the request's quality knob.
    let knob = Features {
        difficulty: Some(0.5),
        quality: Some(0.0),
        ..Features::default()
    };
    assert!(can(&knob, &view(), 0.95, 1.0), "quality 0 sends out only 1");
    assert!(!can(&knob, &view(), 0.4, 0.6));
    // Rules before it decide whatever the difficulty: privacy keeps
    // personal data home, an unreachable cloud takes nothing, a latency
    // goal only the cloud meets sends it out.
    let private = Features {
        privacy: Some(PrivacyMode::Strict),
        pii: [("person".to_owned(), 1)].into(),
        ..scored(0.5, 0.5)
    };
    assert!(!can(&private, &view(), 0.0, 1.0));
    let mut offline = view();
    offline.cloud.as_mut().unwrap().available = false;
    assert!(!can(&f, &offline, 0.0, 1.0));
    let slow = Features {
        prompt_tokens: 2000,
        latency_goal_ms: Some(1000),
        ..scored(0.5, 0.5)
    };
    assert!(!can(&slow, &view(), 0.0, 1.0));
    // The same rules placed after it leave it the decision.
    let mut after = cfg();
    after.rules = vec![Rule::Difficulty, Rule::Latency];
    assert!(difficulty_can_change(&slow, &view(), &after, 0.4, 0.6));
    // No difficulty, nothing to change.
    assert!(!can(&Features::default(), &view(), 0.0, 1.0));
}
