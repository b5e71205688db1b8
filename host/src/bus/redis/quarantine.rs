//! The quarantine on Redis: a list per service queue (`<queue>.quarantine`),
//! the newest entry at its head, trimmed to its bound in the same
//! transaction as each push. Reading is `LRANGE` (nothing moves);
//! removing is `LREM` of each entry dropped, by value, so that entries
//! pushed meanwhile stay.

use super::connection::Inner;
use crate::bus::BusError;

/// Pushes `entry` and trims the list to `bound`.
pub(super) async fn keep(
    inner: &Inner,
    name: &str,
    entry: &[u8],
    bound: u32,
) -> Result<(), BusError> {
    let mut pipe = ::redis::pipe();
    pipe.atomic()
        .cmd("LPUSH")
        .arg(name)
        .arg(entry)
        .ignore()
        .cmd("LTRIM")
        .arg(name)
        .arg(0)
        .arg(i64::from(bound) - 1)
        .ignore();
    inner
        .pipe(&format!("storing into quarantine `{name}`"), &pipe)
        .await
}

/// Every entry, oldest first.
pub(super) async fn read(inner: &Inner, name: &str) -> Result<Vec<Vec<u8>>, BusError> {
    let mut newest_first: Vec<Vec<u8>> = inner
        .query(
            &format!("reading quarantine `{name}`"),
            ::redis::cmd("LRANGE").arg(name).arg(0).arg(-1),
        )
        .await?;
    newest_first.reverse();
    Ok(newest_first)
}

/// Removes the entries `drop` picks.
pub(super) async fn remove(
    inner: &Inner,
    name: &str,
    drop: &crate::bus::PickEntries,
) -> Result<usize, BusError> {
    let mut removed = 0;
    for entry in read(inner, name).await?.iter().filter(|e| drop(e)) {
        let n: usize = inner
            .query(
                &format!("removing from quarantine `{name}`"),
                ::redis::cmd("LREM").arg(name).arg(0).arg(entry),
            )
            .await?;
        removed += n;
    }
    Ok(removed)
}
