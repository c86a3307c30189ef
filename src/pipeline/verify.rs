//! Pure verification: does the stored object match what the client said?

pub use crate::storage::normalize_etag;

/// Checks the object's ETag and size against the client's expectations.
/// The error is the webhook's `last_error`.
pub fn check_object(
    expected_etag: Option<&str>,
    expected_size: Option<i64>,
    actual_etag: &str,
    actual_size: i64,
) -> Result<(), String> {
    if let Some(want) = expected_etag {
        let (want, got) = (normalize_etag(want), normalize_etag(actual_etag));
        if want != got {
            return Err(format!(
                "etag mismatch: expected \"{want}\", object has \"{got}\""
            ));
        }
    }
    if let Some(want) = expected_size
        && want != actual_size
    {
        return Err(format!(
            "size mismatch: expected {want} bytes, object has {actual_size}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_compare_without_quotes() {
        assert!(check_object(Some("abc"), None, "\"abc\"", 1).is_ok());
        assert!(check_object(Some("\"abc-3\""), None, "abc-3", 1).is_ok());
        let err = check_object(Some("abc"), None, "\"abd\"", 1).unwrap_err();
        assert!(err.contains("etag mismatch"), "{err}");
    }

    #[test]
    fn multipart_etags_are_opaque() {
        assert!(
            check_object(
                Some("d41d8cd98f00b204e9800998ecf8427e-2"),
                None,
                "d41d8cd98f00b204e9800998ecf8427e",
                1
            )
            .is_err()
        );
    }

    #[test]
    fn size_is_checked_when_expected() {
        assert!(check_object(None, Some(5), "x", 5).is_ok());
        assert!(check_object(None, None, "x", 5).is_ok());
        let err = check_object(None, Some(4), "x", 5).unwrap_err();
        assert_eq!(err, "size mismatch: expected 4 bytes, object has 5");
    }
}
