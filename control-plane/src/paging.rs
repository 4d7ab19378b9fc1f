//! Pages of the operator API's lists (devices, models, rollouts), as
//! Google's AIP-158 has them: a request's `page_size` (0 for the default)
//! and `page_token` (the previous answer's `next_page_token`), an answer's
//! `next_page_token` (empty on the last page).
//!
//! A token names where the previous page ended (a device id, a model
//! version, a rollout id: keyset pagination), so each page is one indexed
//! query however deep into the list, and items added or removed between
//! pages shift nothing: no item is sent twice or skipped. A token also
//! names its list and filter: handed to another list, or with another
//! filter, it is refused instead of starting somewhere meaningless. Tokens
//! are opaque to clients (hex of a small JSON document) and checked like
//! any other input when they come back.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Status;

/// Items in a page when the request does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 500;
/// The most items in a page: a larger `page_size` is taken as this. A
/// page of the largest items (devices, with their inventory and models)
/// stays well under a gRPC client's default 4 MiB message limit.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The page size to serve for a request's `page_size`.
pub fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// One list with one filter: reads the tokens it gave and makes new ones.
#[derive(Debug, Clone, Copy)]
pub struct Pages<'a> {
    list: &'static str,
    filter: &'a str,
}

#[derive(Serialize, serde::Deserialize)]
struct Token<K> {
    list: String,
    filter: String,
    after: K,
}

impl<'a> Pages<'a> {
    /// `list` names the list (as in its RPC); `filter` is the request's
    /// filter as sent (a selector, a name; empty for none).
    pub fn new(list: &'static str, filter: &'a str) -> Self {
        Self { list, filter }
    }

    /// Where the page asked for starts: `None` for the first page (an
    /// empty token), else the key the previous page ended on.
    /// INVALID_ARGUMENT for a token this list did not give, or gave with
    /// another filter.
    pub fn after<K: DeserializeOwned>(&self, token: &str) -> Result<Option<K>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || {
            Status::invalid_argument(format!(
                "page_token is not a token {} gave; pass the next_page_token of its previous page, \
                 or none for the first page",
                self.list
            ))
        };
        let bytes = hex::decode(token).map_err(|_| invalid())?;
        let token: Token<K> = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if token.list != self.list {
            return Err(invalid());
        }
        if token.filter != self.filter {
            return Err(Status::invalid_argument(format!(
                "page_token was given for another filter ({:?}); list with the same one, \
                 or start again without a token",
                token.filter
            )));
        }
        Ok(Some(token.after))
    }

    /// The `next_page_token` of a page: empty when no item follows it,
    /// else a token for the items after `last` (the page's last item's key).
    pub fn next<K: Serialize>(&self, more: bool, last: Option<K>) -> String {
        let Some(after) = last.filter(|_| more) else {
            return String::new();
        };
        let token = Token {
            list: self.list.to_string(),
            filter: self.filter.to_string(),
            after,
        };
        // A struct of strings and integers always encodes.
        hex::encode(serde_json::to_vec(&token).unwrap_or_default())
    }
}

/// Splits items read one past the page size into the page and whether
/// more follow it.
pub fn split<T>(mut items: Vec<T>, size: u32) -> (Vec<T>, bool) {
    let size = size as usize;
    let more = items.len() > size;
    items.truncate(size);
    (items, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn page_size_defaults_and_caps() {
        assert_eq!(page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(MAX_PAGE_SIZE), MAX_PAGE_SIZE);
        assert_eq!(page_size(u32::MAX), MAX_PAGE_SIZE);
    }

    #[test]
    fn a_token_round_trips_for_its_list_and_filter_only() {
        let pages = Pages::new("ListDevices", "site=paris");
        let token = pages.next(true, Some("dev-42"));
        assert!(!token.is_empty());
        assert_eq!(
            pages.after::<String>(&token).unwrap().as_deref(),
            Some("dev-42")
        );
        assert_eq!(pages.after::<String>("").unwrap(), None);

        let other_filter = Pages::new("ListDevices", "site=nice");
        let status = other_filter.after::<String>(&token).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("another filter"), "{status:?}");

        let other_list = Pages::new("ListRollouts", "site=paris");
        let status = other_list.after::<String>(&token).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("ListRollouts"), "{status:?}");
    }

    #[test]
    fn garbage_and_mistyped_tokens_are_invalid() {
        let pages = Pages::new("ListModels", "");
        for token in [
            "zz",
            "00",
            "not hex",
            &hex::encode(b"{\"list\":\"ListModels\"}"),
        ] {
            let status = pages.after::<(String, u64)>(token).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{token}");
        }
        // A device token's key is not a model version's.
        let device_token = Pages::new("ListModels", "").next(true, Some("dev-1"));
        assert_eq!(
            pages
                .after::<(String, u64)>(&device_token)
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn the_last_page_has_no_token() {
        let pages = Pages::new("ListDevices", "");
        assert_eq!(pages.next(false, Some("dev-9")), "");
        assert_eq!(pages.next::<&str>(true, None), "");
    }

    #[test]
    fn split_tells_whether_more_follow() {
        assert_eq!(split(vec![1, 2, 3], 2), (vec![1, 2], true));
        assert_eq!(split(vec![1, 2], 2), (vec![1, 2], false));
        assert_eq!(split(Vec::<u8>::new(), 2), (vec![], false));
    }
}
