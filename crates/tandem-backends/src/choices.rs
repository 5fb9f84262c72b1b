//! One upstream answer of several choices (`n`) split into a stream per
//! choice, so that each is supervised like any answer: its placeholders
//! restored, its break handed over on its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use futures::stream::BoxStream;
use tandem_api::{ApiError, CHOICE_NOT_ANSWERED, Event, EventStream};
use tokio::sync::mpsc;

/// An answer's events, each with the index of its choice; an error ends
/// every choice.
pub(crate) type Indexed = BoxStream<'static, Result<(u32, Event), ApiError>>;

/// `n` streams, one per choice of `events`, in index order. A choice the
/// upstream did not finish ends with an error; one it never answered (it
/// ignored `n`) with [`CHOICE_NOT_ANSWERED`], so that it can be asked for
/// on its own, and `ignores_n` is set so that later requests are. The
/// upstream is read for as long as any choice's stream is still held;
/// dropping them all drops the request.
pub(crate) fn split(
    events: Indexed,
    n: u32,
    upstream: &str,
    ignores_n: Arc<AtomicBool>,
) -> Vec<EventStream> {
    if n <= 1 {
        let cut = unfinished(upstream, n, 0, true);
        return vec![Box::pin(async_stream::stream! {
            let mut events = events;
            while let Some(e) = events.next().await {
                match e {
                    Ok((_, ev)) => {
                        let end = matches!(ev, Event::Finish(_));
                        yield Ok(ev);
                        if end {
                            return;
                        }
                    }
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                }
            }
            yield Err(cut);
        })];
    }
    let name = upstream.to_owned();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    tokio::spawn(async move {
        let mut events = events;
        // Per choice: whether it has had an event, and whether it is over.
        let mut seen = vec![false; senders.len()];
        let mut over = vec![false; senders.len()];
        loop {
            let next = tokio::select! {
                next = events.next() => next,
                () = all_closed(&senders) => return,
            };
            match next {
                Some(Ok((i, ev))) => {
                    let i = i as usize;
                    // An index past those asked for, or a choice already
                    // over, is not passed on.
                    let (Some(tx), Some(false)) = (senders.get(i), over.get(i).copied()) else {
                        continue;
                    };
                    if let Some(s) = seen.get_mut(i) {
                        *s = true;
                    }
                    if let (Event::Finish(_), Some(o)) = (&ev, over.get_mut(i)) {
                        *o = true;
                    }
                    let _ = tx.send(Ok(ev));
                }
                Some(Err(e)) => {
                    for (tx, _) in senders.iter().zip(&over).filter(|(_, o)| !**o) {
                        let _ = tx.send(Err(e.clone()));
                    }
                    return;
                }
                None => {
                    if seen.iter().any(|s| !s) && !ignores_n.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            upstream = %name,
                            "the upstream ignores `n`: choices are asked for one by one from now"
                        );
                    }
                    for (i, ((tx, o), s)) in (0u32..).zip(senders.iter().zip(&over).zip(&seen)) {
                        if !o {
                            let _ = tx.send(Err(unfinished(&name, n, i, *s)));
                        }
                    }
                    return;
                }
            }
        }
    });
    receivers
        .into_iter()
        .map(|rx| {
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
                .boxed()
        })
        .collect()
}

/// The error that ends choice `i` of `n` when the upstream stops before
/// finishing it: cut short when it had begun (or was the only one asked
/// for), never answered otherwise.
fn unfinished(upstream: &str, n: u32, i: u32, seen: bool) -> ApiError {
    if seen || n == 1 {
        ApiError::bad_gateway(format!(
            "upstream `{upstream}` ended the stream before finishing the answer"
        ))
    } else {
        ApiError::bad_gateway(format!(
            "upstream `{upstream}` answered no choice {i} of the {n} asked for"
        ))
        .with_code(CHOICE_NOT_ANSWERED)
    }
}

/// Resolves once every receiver has gone.
async fn all_closed<T>(senders: &[mpsc::UnboundedSender<T>]) {
    futures::future::join_all(senders.iter().map(mpsc::UnboundedSender::closed)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_api::{Delta, Finish, FinishReason, Usage};

    fn fin(prompt: u32, completion: u32) -> Event {
        Event::Finish(Finish {
            reason: FinishReason::Stop,
            usage: Usage::new(prompt, completion),
        })
    }

    async fn texts(s: EventStream) -> (String, Result<Usage, String>) {
        let mut s = s;
        let mut text = String::new();
        while let Some(e) = s.next().await {
            match e {
                Ok(Event::Delta(d)) => text.push_str(&d.text),
                Ok(Event::Finish(f)) => return (text, Ok(f.usage)),
                Err(e) => return (text, Err(e.message)),
            }
        }
        (text, Err("no end".into()))
    }

    fn indexed(events: Vec<Result<(u32, Event), ApiError>>) -> Indexed {
        futures::stream::iter(events).boxed()
    }

    #[tokio::test]
    async fn each_choice_gets_its_own_events_and_a_missing_one_is_named() {
        let d = |t: &str| Event::Delta(Delta::text(t));
        let ignores = Arc::new(AtomicBool::new(false));
        let streams = split(
            indexed(vec![
                Ok((1, d("b"))),
                Ok((0, d("a"))),
                Ok((1, d("b"))),
                Ok((7, d("?"))),
                Ok((0, fin(5, 3))),
                Ok((1, fin(5, 0))),
                Ok((1, d("late"))),
            ]),
            3,
            "up",
            ignores.clone(),
        );
        let got = futures::future::join_all(streams.into_iter().map(texts)).await;
        assert_eq!(got[0], ("a".into(), Ok(Usage::new(5, 3))));
        assert_eq!(got[1], ("bb".into(), Ok(Usage::new(5, 0))));
        assert_eq!(got[2].0, "");
        assert!(got[2].1.as_ref().is_err_and(|e| e.contains("no choice 2")));
        assert!(
            ignores.load(Ordering::Relaxed),
            "the upstream is remembered to ignore `n`"
        );
    }

    #[tokio::test]
    async fn a_break_ends_every_unfinished_choice() {
        let d = |t: &str| Event::Delta(Delta::text(t));
        let streams = split(
            indexed(vec![
                Ok((0, d("a"))),
                Ok((1, d("b"))),
                Ok((1, fin(5, 0))),
                Err(ApiError::bad_gateway("cut")),
            ]),
            2,
            "up",
            Arc::default(),
        );
        let got = futures::future::join_all(streams.into_iter().map(texts)).await;
        assert_eq!(got[0], ("a".into(), Err("cut".into())));
        assert_eq!(got[1], ("b".into(), Ok(Usage::new(5, 0))));

        // One choice: the stream as it came, an unfinished end an error.
        let one = split(indexed(vec![Ok((0, d("a")))]), 1, "up", Arc::default());
        let got = futures::future::join_all(one.into_iter().map(texts)).await;
        assert!(
            got[0]
                .1
                .as_ref()
                .is_err_and(|e| e.contains("before finishing"))
        );
        let one = split(
            indexed(vec![Ok((0, d("a"))), Ok((0, fin(1, 1)))]),
            1,
            "up",
            Arc::default(),
        );
        let got = futures::future::join_all(one.into_iter().map(texts)).await;
        assert_eq!(got[0], ("a".into(), Ok(Usage::new(1, 1))));
    }
}
