//! Each rule's effect on the two sides, one arm per rule.

use tandem_api::{Feature, Locality};

use super::{CloudView, Features, PolicyConfig, PrivacyMode, Rule, View, threshold_for_quality};

/// What a rule does to a side.
pub(super) enum Apply {
    Forbid(Locality, String),
    Prefer(Locality, String),
}

fn describe(features: &[Feature]) -> String {
    features
        .iter()
        .map(|f| f.describe())
        .collect::<Vec<_>>()
        .join(", ")
}

fn estimate_cost(f: &Features, c: &CloudView) -> f64 {
    let out = f.max_tokens.unwrap_or(256).min(1024);
    (f64::from(f.prompt_tokens) * c.price_input_per_mtok + f64::from(out) * c.price_output_per_mtok)
        / 1e6
}

pub(super) fn apply(rule: Rule, f: &Features, v: &View, cfg: &PolicyConfig) -> Vec<Apply> {
    let mut out = Vec::new();
    match rule {
        Rule::NamedModel => {
            if let Some(side) = f.named {
                out.push(Apply::Forbid(
                    side.other(),
                    "the request names a model served on the other side".into(),
                ));
                out.push(Apply::Prefer(side, "the request names this model".into()));
            }
        }
        Rule::Privacy => {
            let mode = f.privacy.unwrap_or(cfg.privacy);
            if mode != PrivacyMode::Off {
                if let Some(why) = &f.pii_unchecked {
                    // Unchecked data does not leave: not raw, and not
                    // redacted by a detector that could not run.
                    out.push(Apply::Forbid(
                        Locality::Cloud,
                        format!(
                            "{} mode and the request could not be checked: {why}",
                            mode.as_str()
                        ),
                    ));
                } else if mode == PrivacyMode::Strict && !f.pii.is_empty() {
                    let found: Vec<String> =
                        f.pii.iter().map(|(c, n)| format!("{c} ×{n}")).collect();
                    out.push(Apply::Forbid(
                        Locality::Cloud,
                        format!("strict mode and the request contains {}", found.join(", ")),
                    ));
                }
            }
        }
        // A request naming a model gets that backend's own, more precise
        // error (context length, unsupported field) instead of a refusal.
        Rule::Capability if f.named.is_some() => {}
        Rule::Capability => {
            if v.local.available && f.prompt_tokens >= v.local.context_length {
                out.push(Apply::Forbid(
                    Locality::Local,
                    format!(
                        "prompt of {} tokens exceeds the local context of {}",
                        f.prompt_tokens, v.local.context_length
                    ),
                ));
            } else if v.local.available
                && f.max_tokens
                    .is_some_and(|m| f.prompt_tokens.saturating_add(m) > v.local.context_length)
            {
                out.push(Apply::Prefer(
                    Locality::Cloud,
                    format!(
                        "prompt and max_tokens need {} tokens, more than the local context of {}",
                        f.prompt_tokens.saturating_add(f.max_tokens.unwrap_or(0)),
                        v.local.context_length
                    ),
                ));
            }
            let local_lacks = v.local.capabilities.missing(&f.needs);
            if v.local.available && !local_lacks.is_empty() {
                out.push(Apply::Forbid(
                    Locality::Local,
                    format!("the local model lacks {}", describe(&local_lacks)),
                ));
            } else if let Some(why) = f.local_refuses.as_ref().filter(|_| v.local.available) {
                out.push(Apply::Forbid(
                    Locality::Local,
                    format!("the local model cannot enforce it: {why}"),
                ));
            }
            if let Some(c) = &v.cloud {
                let cloud_lacks = c.capabilities.missing(&f.needs);
                if !cloud_lacks.is_empty() {
                    out.push(Apply::Forbid(
                        Locality::Cloud,
                        format!("upstream {} lacks {}", c.name, describe(&cloud_lacks)),
                    ));
                }
            }
            if let Some(c) = &v.cloud
                && c.context_length.is_some_and(|ctx| f.prompt_tokens >= ctx)
            {
                out.push(Apply::Forbid(
                    Locality::Cloud,
                    format!(
                        "prompt exceeds the cloud model's context of {}",
                        c.context_length.unwrap_or(0)
                    ),
                ));
            }
        }
        Rule::Network => match &v.cloud {
            None => {}
            Some(c) if c.breaker_open => out.push(Apply::Forbid(
                Locality::Cloud,
                format!("upstream {} is failing (circuit open)", c.name),
            )),
            Some(c) if !c.available => out.push(Apply::Forbid(
                Locality::Cloud,
                format!("upstream {} is unreachable", c.name),
            )),
            Some(_) if v.network.metered && cfg.avoid_metered => out.push(Apply::Prefer(
                Locality::Local,
                "the connection is metered".into(),
            )),
            Some(_) => {}
        },
        Rule::Budget => {
            if let Some(b) = v.spend.budget_usd
                && v.spend.today_usd >= b
            {
                out.push(Apply::Forbid(
                    Locality::Cloud,
                    format!(
                        "daily budget of ${b:.2} spent (${:.4} today)",
                        v.spend.today_usd
                    ),
                ));
            }
            if let Some(b) = v.spend.key_budget_usd
                && v.spend.key_today_usd >= b
            {
                out.push(Apply::Forbid(
                    Locality::Cloud,
                    format!(
                        "this key's daily budget of ${b:.2} spent (${:.4} today)",
                        v.spend.key_today_usd
                    ),
                ));
            }
            if let (Some(c), Some(b)) = (&v.cloud, v.spend.budget_usd) {
                let est = estimate_cost(f, c);
                if v.spend.today_usd + est > b && v.spend.today_usd < b {
                    out.push(Apply::Prefer(
                        Locality::Local,
                        format!("estimated ${est:.4} would exceed the daily budget"),
                    ));
                }
            }
        }
        Rule::Load => {
            let l = &v.local;
            if l.available && l.active >= l.capacity && l.queued >= cfg.max_local_queue {
                out.push(Apply::Prefer(
                    Locality::Cloud,
                    format!(
                        "local engine saturated: {} running, {} waiting",
                        l.active, l.queued
                    ),
                ));
            }
        }
        Rule::Device => {
            let d = &v.device;
            if let (Some(pct), Some(false)) = (d.battery_pct, d.charging)
                && pct < cfg.low_battery_pct
            {
                out.push(Apply::Prefer(
                    Locality::Cloud,
                    format!("battery at {pct:.0}% and not charging"),
                ));
            }
            if let Some(t) = d.temperature_c
                && t >= cfg.hot_temperature_c
            {
                out.push(Apply::Prefer(
                    Locality::Cloud,
                    format!("device at {t:.0} C"),
                ));
            }
            if let Some(m) = d.free_memory_mb
                && m < cfg.low_memory_mb
            {
                out.push(Apply::Prefer(
                    Locality::Cloud,
                    format!("only {m} MB of memory free"),
                ));
            }
            // A cloud on this machine (a cloud-role Tandem beside this one,
            // as when trying the pair on one computer) takes no work off
            // these cores, and is itself "other work": each request sent
            // there for the load would raise the load that sent it.
            if let (Some(load), Some(cores)) = (d.cpu_load, d.cores)
                && !v.cloud.as_ref().is_some_and(|c| c.on_this_machine)
                && cores > 0
                && load / cores as f32 >= cfg.busy_cpu_share
            {
                out.push(Apply::Prefer(
                    Locality::Cloud,
                    format!("other work keeps {load:.1} of {cores} cores busy"),
                ));
            }
        }
        Rule::Latency => {
            if let (Some(goal), Some(c)) = (f.latency_goal_ms, &v.cloud) {
                let goal = f64::from(goal);
                let local = v.local.prefill_tps.map(|tps| {
                    // Waiting requests delay this one by about one prefill each.
                    let wait = v.local.queued as f64 + 1.0;
                    f64::from(f.prompt_tokens) / tps * 1000.0 * wait
                });
                let cloud = match (c.ttft_ms, c.rtt_ms) {
                    (Some(t), _) => Some(t),
                    (None, Some(r)) => Some(r * 2.0),
                    _ => None,
                };
                match (local, cloud) {
                    (Some(l), Some(cl)) if l > goal && cl <= goal => out.push(Apply::Prefer(
                        Locality::Cloud,
                        format!("first token expected in {l:.0} ms locally, {cl:.0} ms in the cloud; goal {goal:.0} ms"),
                    )),
                    (Some(l), Some(cl)) if l <= goal && cl > goal => out.push(Apply::Prefer(
                        Locality::Local,
                        format!("first token expected in {l:.0} ms locally, {cl:.0} ms in the cloud; goal {goal:.0} ms"),
                    )),
                    _ => {}
                }
            }
        }
        Rule::Difficulty => {
            if let Some(score) = f.difficulty {
                // quality 0.5 keeps the configured threshold; 1 sends
                // everything that is not trivially easy, 0 almost nothing.
                let threshold = f.difficulty_threshold.unwrap_or_else(|| {
                    threshold_for_quality(
                        cfg.difficulty_threshold,
                        f.quality.unwrap_or(0.5).clamp(0.0, 1.0),
                    )
                });
                if score >= threshold {
                    out.push(Apply::Prefer(
                        Locality::Cloud,
                        format!("predicted hard for the local model (score {score:.2} >= {threshold:.2})"),
                    ));
                } else {
                    out.push(Apply::Prefer(
                        Locality::Local,
                        format!(
                            "predicted easy for the local model (score {score:.2} < {threshold:.2})"
                        ),
                    ));
                }
            }
        }
        Rule::PreferLocal => out.push(Apply::Prefer(Locality::Local, "local first".into())),
        Rule::PreferCloud => out.push(Apply::Prefer(Locality::Cloud, "cloud first".into())),
    }
    out
}
