//! Date arithmetic: an experiment's `start` and `end`, TOML offset date-times, as the Unix
//! milliseconds the experiment rules keep.

/// Unix milliseconds of a TOML offset date-time.
pub(super) fn datetime_ms(d: &toml::value::Datetime) -> Result<u64, String> {
    use toml::value::Offset;
    let (Some(date), Some(time), Some(offset)) = (d.date, d.time, d.offset) else {
        return Err(format!(
            "'{d}' is not an instant: write a date, a time and a time zone, e.g. 2026-12-01T00:00:00Z"
        ));
    };
    let offset_minutes = match offset {
        Offset::Z => 0,
        Offset::Custom { minutes } => i64::from(minutes),
    };
    let days = days_from_civil(
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    );
    let seconds = days * 86_400
        + i64::from(time.hour) * 3600
        + i64::from(time.minute) * 60
        + i64::from(time.second)
        - offset_minutes * 60;
    if seconds < 0 {
        return Err(format!("'{d}' is before 1970"));
    }
    Ok(seconds as u64 * 1000 + u64::from(time.nanosecond) / 1_000_000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_unix_milliseconds() {
        let d: toml::value::Datetime = "2026-12-01T00:00:00Z".parse().unwrap();
        assert_eq!(datetime_ms(&d).unwrap(), 1_796_083_200_000);
        let d: toml::value::Datetime = "2026-12-01T01:02:03.5+02:00".parse().unwrap();
        assert_eq!(datetime_ms(&d).unwrap(), 1_796_079_723_500);
        let d: toml::value::Datetime = "1969-12-31T23:59:59Z".parse().unwrap();
        assert!(datetime_ms(&d).is_err());
        let d: toml::value::Datetime = "2026-12-01".parse().unwrap();
        assert!(datetime_ms(&d).is_err());
    }
}
