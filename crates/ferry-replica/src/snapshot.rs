//! Transaction snapshots (`txid_snapshot` text form `xmin:xmax:xip,...`): which transactions
//! a copy saw, and whether a tick has seen all of them.

use std::str::FromStr;

/// A txid snapshot: transactions below `xmin` are finished, those at or above `xmax` had not
/// started, and `xip` lists those in between still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: i64,
    xmax: i64,
    xip: Vec<i64>,
}

impl Snapshot {
    /// Whether the effects of committed transaction `txid` are visible in this snapshot.
    pub fn sees(&self, txid: i64) -> bool {
        txid < self.xmin || (txid < self.xmax && self.xip.binary_search(&txid).is_err())
    }

    /// Whether every transaction visible in `earlier` is also visible in `self`: then no event
    /// after `self` can belong to a transaction `earlier` saw.
    pub fn sees_all_of(&self, earlier: &Snapshot) -> bool {
        if earlier.xmax > self.xmax {
            return false;
        }
        // below earlier.xmax, only transactions self still counted as running can be missing
        self.xip
            .iter()
            .take_while(|x| **x < earlier.xmax)
            .all(|x| !earlier.sees(*x))
    }
}

/// Parses the text form of `txid_snapshot` / `pg_snapshot`.
impl FromStr for Snapshot {
    type Err = String;

    fn from_str(text: &str) -> Result<Snapshot, String> {
        let bad = || format!("not a txid snapshot: {text:?}");
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xmax = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xip_text = parts.next().ok_or_else(bad)?;
        let mut xip = if xip_text.is_empty() {
            Vec::new()
        } else {
            xip_text
                .split(',')
                .map(|x| x.parse().map_err(|_| bad()))
                .collect::<Result<Vec<i64>, String>>()?
        };
        xip.sort_unstable();
        Ok(Snapshot { xmin, xmax, xip })
    }
}

/// The text form PostgreSQL reads back as `txid_snapshot`: `xmin:xmax:xip,...`.
impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (at, x) in self.xip.iter().enumerate() {
            if at > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Snapshot {
        text.parse().unwrap()
    }

    #[test]
    fn visibility() {
        let s = snap("10:20:12,15");
        assert!(s.sees(9));
        assert!(s.sees(10));
        assert!(!s.sees(12));
        assert!(s.sees(13));
        assert!(!s.sees(15));
        assert!(!s.sees(20));
        assert!(!s.sees(25));
        assert!(snap("10:10:").sees(9));
        assert!("garbage".parse::<Snapshot>().is_err());
    }

    #[test]
    fn text_round_trip() {
        for text in ["10:20:12,15", "10:10:", "7:9:8"] {
            assert_eq!(snap(text).to_string(), text);
        }
    }

    #[test]
    fn covering() {
        let copy = snap("10:20:12,15");
        // a later tick where 12 and 15 are still running sees what the copy saw
        assert!(snap("12:25:12,15,21").sees_all_of(&copy));
        // a tick that still counts 13 as running (the copy saw 13) does not
        assert!(!snap("12:25:12,13").sees_all_of(&copy));
        // a tick taken before the copy's xmax does not
        assert!(!snap("5:18:").sees_all_of(&copy));
        assert!(snap("30:30:").sees_all_of(&copy));
    }
}
