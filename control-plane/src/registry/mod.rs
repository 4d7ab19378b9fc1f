//! The model registry: ONNX validation, the content-addressed blob store,
//! signing with the fleet release key, `ModelService`, and blob downloads
//! for agents.

use std::path::{Path, PathBuf};

use edgefleet_pki::ReleaseKey;

pub mod download;

/// Where model blobs live: `DATA_DIR/blobs/sha256/<first 2 hex>/<hex>`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    pub fn new(data_dir: &Path) -> BlobStore {
        BlobStore {
            root: data_dir.join("blobs").join("sha256"),
        }
    }

    /// The file of a blob (whether or not it exists).
    pub fn path(&self, sha256: &str) -> PathBuf {
        let prefix = sha256.get(..2).unwrap_or("00");
        self.root.join(prefix).join(sha256)
    }
}

/// The registry's parts every handler shares.
#[derive(Debug)]
pub struct Registry {
    pub blobs: BlobStore,
    pub release_key: ReleaseKey,
}

impl Registry {
    /// Opens the blob store and loads or creates the release key (0600).
    pub fn open(data_dir: &Path) -> anyhow::Result<Registry> {
        let (release_key, created) = ReleaseKey::load_or_create(data_dir)?;
        if created {
            tracing::info!("created the fleet release key");
        }
        Ok(Registry {
            blobs: BlobStore::new(data_dir),
            release_key,
        })
    }
}
