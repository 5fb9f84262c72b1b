//! Choosing among upstreams that can serve a request: the order in which
//! they are tried. Upstreams serving the same model are *replicas* of one
//! *deployment*; deployments are tried in their configured order (a second
//! provider after the first), and within one the least busy replica goes
//! first — fewest requests in flight, then the lowest moving average of
//! time to first token (Envoy's least-request and LiteLLM's latency-based
//! routing work the same way). Replicas whose breaker is open or which do
//! not answer probes come last, as a last resort before the device.

use serde::Serialize;

/// One upstream as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replica {
    /// Its name.
    pub name: String,
    /// Its deployment's place in the configured order (0 first).
    pub deployment: u32,
    /// Why it should not be tried, if it should not (breaker open,
    /// unreachable).
    pub unusable: Option<String>,
    /// Requests it is serving now.
    pub in_flight: u32,
    /// Moving average of its time to first token, ms (none measured yet).
    pub ttft_ms: Option<f64>,
}

/// The order to try `replicas` in (indices into it).
///
/// A replica with no measured TTFT sorts as the fastest: a new replica gets
/// traffic and so a measurement.
pub fn order(replicas: &[Replica]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..replicas.len()).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (&replicas[a], &replicas[b]);
        (x.unusable.is_some(), x.deployment, x.in_flight)
            .cmp(&(y.unusable.is_some(), y.deployment, y.in_flight))
            .then_with(|| {
                x.ttft_ms
                    .unwrap_or(0.0)
                    .total_cmp(&y.ttft_ms.unwrap_or(0.0))
            })
            .then_with(|| a.cmp(&b))
    });
    idx
}

fn state(r: &Replica) -> String {
    match &r.unusable {
        Some(why) => format!("{}: {why}", r.name),
        None => match r.ttft_ms {
            Some(t) => format!("{}: {} in flight, TTFT {t:.0} ms", r.name, r.in_flight),
            None => format!(
                "{}: {} in flight, TTFT not measured yet",
                r.name, r.in_flight
            ),
        },
    }
}

/// Why the first of `order` was chosen, naming the others' state, for the
/// decision's explanation.
pub fn describe(replicas: &[Replica], order: &[usize]) -> String {
    let mut parts = order.iter().filter_map(|&i| replicas.get(i)).map(state);
    let first = parts.next().unwrap_or_default();
    let rest: Vec<String> = parts.collect();
    if rest.is_empty() {
        first
    } else {
        format!("{first} (then {})", rest.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, deployment: u32, in_flight: u32, ttft: Option<f64>) -> Replica {
        Replica {
            name: name.into(),
            deployment,
            unusable: None,
            in_flight,
            ttft_ms: ttft,
        }
    }

    #[test]
    fn the_least_busy_replica_goes_first_then_the_fastest() {
        let rs = [
            r("a", 0, 2, Some(100.0)),
            r("b", 0, 1, Some(900.0)),
            r("c", 0, 1, Some(300.0)),
        ];
        assert_eq!(order(&rs), [2, 1, 0]);
        assert_eq!(
            describe(&rs, &order(&rs)),
            "c: 1 in flight, TTFT 300 ms (then b: 1 in flight, TTFT 900 ms; a: 2 in flight, TTFT 100 ms)"
        );
    }

    #[test]
    fn an_unmeasured_replica_is_tried_and_ties_keep_the_configured_order() {
        let rs = [
            r("a", 0, 0, Some(50.0)),
            r("b", 0, 0, None),
            r("c", 0, 0, None),
        ];
        assert_eq!(order(&rs), [1, 2, 0]);
    }

    #[test]
    fn another_provider_comes_after_every_usable_replica_and_broken_ones_last() {
        let mut rs = [
            r("a", 0, 0, None),
            r("b", 0, 9, Some(5000.0)),
            r("other", 1, 0, Some(10.0)),
        ];
        assert_eq!(order(&rs), [0, 1, 2]);
        rs[0].unusable = Some("breaker open".into());
        assert_eq!(order(&rs), [1, 2, 0]);
        assert!(describe(&rs, &order(&rs)).ends_with("a: breaker open)"));
    }
}
