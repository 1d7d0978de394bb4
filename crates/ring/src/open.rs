//! Making a ring file and attaching one end of it: create-or-open without races, header
//! validation, and the per-end lock.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{OpenError, Role};
use crate::layout::{valid_capacity, Word, HEADER_LEN, MAGIC, VERSION};
use crate::raw::{slot_is_locked, try_lock_slot, MmapRegion};

/// An open, locked, validated ring file.
#[derive(Debug)]
pub(crate) struct Attached {
    /// Held open for the lock (released when the last descriptor closes, or at death).
    pub(crate) file: File,
    pub(crate) region: MmapRegion,
    pub(crate) path: PathBuf,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Opens the ring at `path` as `role`. With `create = Some(capacity)` a missing file is made
/// first (and an existing one must have that capacity); with `None` the file must exist.
pub(crate) fn attach(
    path: &Path,
    create: Option<usize>,
    role: Role,
) -> Result<Attached, OpenError> {
    if let Some(capacity) = create {
        if !valid_capacity(capacity as u64) {
            return Err(OpenError::BadCapacity(capacity));
        }
        if !path.exists() {
            create_file(path, capacity as u64)?;
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error(path))?;
    if !try_lock_slot(&file, lock_slot(role)).map_err(io_error(path))? {
        return Err(OpenError::Busy {
            path: path.to_owned(),
            role,
        });
    }
    let capacity = validate_header(&file, path)?;
    if let Some(wanted) = create {
        if wanted as u64 != capacity {
            return Err(OpenError::CapacityMismatch {
                path: path.to_owned(),
                found: capacity,
                wanted: wanted as u64,
            });
        }
    }
    let region = MmapRegion::map(&file, capacity).map_err(io_error(path))?;
    Ok(Attached {
        file,
        region,
        path: path.to_owned(),
    })
}

/// The byte of the file whose lock marks `role` as attached.
pub(crate) fn lock_slot(role: Role) -> i64 {
    match role {
        Role::Writer => 0,
        Role::Reader => 1,
    }
}

/// Whether a live process (or another handle in this one, on Linux) holds `role`'s end.
pub(crate) fn is_attached(file: &File, role: Role) -> std::io::Result<bool> {
    slot_is_locked(file, lock_slot(role))
}

/// Checks that `file` is a ring of this version whose length matches its capacity; returns
/// the capacity.
fn validate_header(file: &File, path: &Path) -> Result<u64, OpenError> {
    let not_a_ring = |reason: String| OpenError::NotARing {
        path: path.to_owned(),
        version: VERSION,
        reason,
    };
    let len = file.metadata().map_err(io_error(path))?.len();
    if len < HEADER_LEN as u64 {
        return Err(not_a_ring(format!(
            "{len} bytes is shorter than the {HEADER_LEN}-byte header"
        )));
    }
    let header = MmapRegion::map_header(file).map_err(io_error(path))?;
    let word = |word| header.header_word(word);
    let magic = word(Word::Magic);
    if magic != MAGIC {
        return Err(not_a_ring(format!("magic {magic:#018x}")));
    }
    let version = word(Word::Version);
    if version != VERSION {
        return Err(not_a_ring(format!("version {version}")));
    }
    let header_len = word(Word::HeaderLen);
    if header_len != HEADER_LEN as u64 {
        return Err(not_a_ring(format!("header length {header_len}")));
    }
    let capacity = word(Word::Capacity);
    if !valid_capacity(capacity) {
        return Err(not_a_ring(format!("capacity {capacity}")));
    }
    if len != HEADER_LEN as u64 + capacity {
        return Err(not_a_ring(format!("{len} bytes for capacity {capacity}")));
    }
    Ok(capacity)
}

/// Makes a whole, initialised ring file under a private name and links it to `path`. Linking
/// never replaces an existing file, so when two processes race to create the ring one wins and
/// the other opens the winner's file; nobody ever sees a half-initialised one.
fn create_file(path: &Path, capacity: u64) -> Result<(), OpenError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = path.with_file_name(format!(".{name}.{}.{nonce}.tmp", std::process::id()));
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o660)
            .open(&tmp)?;
        file.set_len(HEADER_LEN as u64 + capacity)?;
        let region = MmapRegion::map(&file, capacity)?;
        region.init_word(Word::Version, VERSION);
        region.init_word(Word::HeaderLen, HEADER_LEN as u64);
        region.init_word(Word::Capacity, capacity);
        region.init_word(Word::Magic, MAGIC);
        region.flush()?;
        match std::fs::hard_link(&tmp, path) {
            Err(err) if err.kind() != io::ErrorKind::AlreadyExists => Err(err),
            _ => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map_err(io_error(path))
}
