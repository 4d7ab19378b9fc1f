//! Whole lists from the server's pages: the list commands ask for one page
//! after another (each call's answer stays small, however large the
//! fleet) and print them together, as `kubectl get` does with its chunks.

use std::future::Future;

use anyhow::bail;

/// How many items each call of a list command asks for.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct PageSize {
    /// Items to fetch per call to the server; the command fetches them all.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub page_size: u32,
}

/// Every item of a list: `page(token)` fetches the page that `token` (empty
/// for the first) starts, as (items, next page's token), until a page
/// comes without a next token.
pub async fn all_pages<T, F, Fut>(mut page: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (mut batch, next) = page(token.clone()).await?;
        items.append(&mut batch);
        if next.is_empty() {
            return Ok(items);
        }
        if next == token {
            bail!("the server sent the same page token twice; its list cannot be read to the end");
        }
        token = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn follows_tokens_to_the_last_page() {
        let pages = [
            ("", vec![1, 2], "a"),
            ("a", vec![3, 4], "b"),
            ("b", vec![5], ""),
        ];
        let pages = &pages;
        let items = runtime()
            .block_on(all_pages(|token| async move {
                let (_, items, next) = pages
                    .iter()
                    .find(|(t, _, _)| *t == token)
                    .expect("a token the server gave");
                Ok((items.clone(), next.to_string()))
            }))
            .unwrap();
        assert_eq!(items, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_token_repeated_is_an_error_not_a_loop() {
        let error = runtime()
            .block_on(all_pages(|_| async { Ok((vec![1], "same".to_string())) }))
            .unwrap_err();
        assert!(
            error.to_string().contains("same page token twice"),
            "{error}"
        );
    }
}
