//! The settings parsers that belong to configuration alone: `--retention`, one duration for every
//! record family or one per family. (Durations are parsed by `spec`, webhooks by `webhook` and TLS
//! files checked by `tls`, each next to what it configures.)

use std::time::Duration;

use crate::spec::parse_duration;
use crate::storage::Retention;

/// Parses a retention: `7d` for every family, or `predictions=7d,outcomes=30d,features=1d`
/// (families not named keep the 7-day default).
pub fn parse_retention(s: &str) -> Result<Retention, String> {
    let positive = |v: &str| -> Result<Duration, String> {
        let d = parse_duration(v).map_err(|e| e.to_string())?;
        if d < Duration::from_secs(1) {
            return Err(format!("'{v}' is shorter than one second"));
        }
        Ok(d)
    };
    if !s.contains('=') {
        let d = positive(s.trim())?;
        return Ok(Retention {
            predictions: d,
            outcomes: d,
            features: d,
        });
    }
    let mut r = Retention::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (family, v) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not family=duration"))?;
        let d = positive(v.trim())?;
        match family.trim() {
            "predictions" => r.predictions = d,
            "outcomes" => r.outcomes = d,
            "features" => r.features = d,
            other => {
                return Err(format!(
                    "unknown family '{other}'; expected predictions, outcomes or features"
                ))
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::load;

    #[test]
    fn retention_specs() {
        let day = Duration::from_secs(86_400);
        let r = parse_retention("1d").unwrap();
        assert_eq!((r.predictions, r.outcomes, r.features), (day, day, day));
        let r = parse_retention("outcomes=30d, features=1h").unwrap();
        assert_eq!(r.predictions, 7 * day);
        assert_eq!(r.outcomes, 30 * day);
        assert_eq!(r.features, Duration::from_secs(3600));
        assert!(parse_retention("events=1d")
            .unwrap_err()
            .contains("unknown family"));
        assert!(parse_retention("0s").is_err());
        let err = load(&["--retention", "soon"], &[], None).unwrap_err();
        assert!(err.contains("--retention"), "{err}");
    }
}
