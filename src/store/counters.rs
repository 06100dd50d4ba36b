//! The counter encoding of the `counters` family, shared by every kind of record that counts:
//! tagged little-endian integers (`i`), floats (`f`) and signed moments (`w`), merged by
//! addition ([`add_counters`], the family's merge operator), so that counting never needs a read.

use rocksdb::MergeOperands;

/// An integer operand: tag 'i', i64 LE.
pub(super) fn int_counter(v: i64) -> [u8; 9] {
    let mut b = [b'i'; 9];
    b[1..].copy_from_slice(&v.to_le_bytes());
    b
}

/// A float operand: tag 'f', f64 LE.
pub(super) fn float_counter(v: f64) -> [u8; 9] {
    let mut b = [b'f'; 9];
    b[1..].copy_from_slice(&v.to_le_bytes());
    b
}

/// A numeric-outcome moments operand: tag 'w', n (i64, negative to take observations back),
/// mean, M2.
pub(super) fn moments_counter(n: i64, mean: f64, m2: f64) -> [u8; 25] {
    let mut b = [b'w'; 25];
    b[1..9].copy_from_slice(&n.to_le_bytes());
    b[9..17].copy_from_slice(&mean.to_le_bytes());
    b[17..].copy_from_slice(&m2.to_le_bytes());
    b
}

/// A decoded counter value.
pub(super) enum Counter {
    /// A count.
    Int(i64),
    /// A sum.
    Float(f64),
    /// Signed moments: n, mean, M2.
    Moments(i64, f64, f64),
}

/// Decodes a stored counter (or an operand); `None` when malformed.
pub(super) fn parse_counter(v: &[u8]) -> Option<Counter> {
    let le = |b: &[u8]| -> Option<[u8; 8]> { b.try_into().ok() };
    match (v.first()?, v.len()) {
        (b'i', 9) => Some(Counter::Int(i64::from_le_bytes(le(&v[1..])?))),
        (b'f', 9) => Some(Counter::Float(f64::from_le_bytes(le(&v[1..])?))),
        (b'w', 25) => Some(Counter::Moments(
            i64::from_le_bytes(le(&v[1..9])?),
            f64::from_le_bytes(le(&v[9..17])?),
            f64::from_le_bytes(le(&v[17..])?),
        )),
        _ => None,
    }
}

/// Merge operator of `counters`: adds tagged integers or floats, and combines tagged moments.
/// A malformed operand is skipped rather than poisoning the counter.
pub(super) fn add_counters(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &MergeOperands,
) -> Option<Vec<u8>> {
    let mut int: Option<i64> = None;
    let mut float: Option<f64> = None;
    let mut moments: Option<(i64, f64, f64)> = None;
    for v in existing.into_iter().chain(operands.iter()) {
        match parse_counter(v) {
            Some(Counter::Int(i)) => int = Some(int.unwrap_or(0).wrapping_add(i)),
            Some(Counter::Float(f)) => float = Some(float.unwrap_or(0.0) + f),
            Some(Counter::Moments(n, mean, m2)) => {
                moments = Some(crate::stats::combine_signed_moments(
                    moments.unwrap_or((0, 0.0, 0.0)),
                    (n, mean, m2),
                ))
            }
            None => {}
        }
    }
    match (int, float, moments) {
        (_, _, Some((n, mean, m2))) => Some(moments_counter(n, mean, m2).to_vec()),
        (_, Some(f), None) => Some(float_counter(f).to_vec()),
        (Some(i), None, None) => Some(int_counter(i).to_vec()),
        (None, None, None) => existing.map(<[u8]>::to_vec),
    }
}

#[cfg(test)]
mod tests {
    use crate::stats::combine_signed_moments;

    #[test]
    fn signed_moments_add_and_take_back() {
        let mut acc = (0, 0.0, 0.0);
        for x in [1.0, 2.0, 4.0, 8.0] {
            acc = combine_signed_moments(acc, (1, x, 0.0));
        }
        assert_eq!(acc.0, 4);
        assert!((acc.1 - 3.75).abs() < 1e-12);
        // Taking 8 back leaves the moments of [1, 2, 4].
        let back = combine_signed_moments(acc, (-1, 8.0, 0.0));
        assert_eq!(back.0, 3);
        assert!((back.1 - 7.0 / 3.0).abs() < 1e-12);
        let var = back.2 / 2.0;
        assert!((var - 2.333_333_333_333_333_5).abs() < 1e-9, "{var}");
    }
}
