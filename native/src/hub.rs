//! Models by name: `--hf OWNER/REPO[:FILE]` (also `-hf`, llama.cpp's spelling) fetches a GGUF file from the
//! Hugging Face hub into the hub's cache on this machine, the one Python's `huggingface_hub` uses too
//! (`$HF_HOME/hub`, by default `~/.cache/huggingface/hub`); `bitnet models` lists and removes what is there.
//!
//! The `hf-hub` crate speaks the hub's protocol and keeps its cache layout: `models--OWNER--REPO/blobs/<etag>`,
//! `snapshots/<commit>/<file>` (links to the blobs), `refs/main`. A download cut short stays as
//! `blobs/<etag>.part` and resumes from its length (an HTTP Range request) the next time; a file already
//! in the cache is used with no network at all (offline). `HF_ENDPOINT` points at another hub (a mirror, or
//! the tests' mock), and `HF_TOKEN` (else the token file `huggingface-cli login` writes) is sent for gated and
//! private repositories. After a download, the file's size is checked against the one the hub announced and
//! its SHA-256 against the hub's (an LFS file's ETag); a file that fails either is deleted.

use std::path::{Path, PathBuf};

use bitnet_engine::Error;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo};
use sha2::{Digest, Sha256};

/// `OWNER/REPO[:FILE]` split, checked.
struct ModelRef {
    repo: String,
    file: Option<String>,
}

fn parse(spec: &str) -> Result<ModelRef, Error> {
    let (repo, file) = match spec.split_once(':') {
        Some((repo, file)) => (repo, Some(file.to_owned())),
        None => (spec, None),
    };
    let part_ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let parts: Vec<&str> = repo.split('/').collect();
    let file_ok = file.as_deref().is_none_or(|f| !f.is_empty() && !f.split('/').any(|p| p.is_empty() || p == ".."));
    if parts.len() != 2 || !parts.iter().all(|p| part_ok(p)) || !file_ok {
        return Err(Error::Invalid(format!("'{spec}' is not a model name: OWNER/REPO or OWNER/REPO:FILE.gguf")));
    }
    Ok(ModelRef { repo: repo.to_owned(), file })
}

fn hub_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{what}: {e}"))
}

/// The local path of the file `spec` names: from the cache if it is there, else downloaded into it.
pub fn fetch(spec: &str) -> Result<PathBuf, Error> {
    let r = parse(spec)?;
    let cache = Cache::from_env();
    let repo = Repo::model(r.repo.clone());
    let file = match r.file {
        Some(file) => file,
        None => only_gguf(&cache, &repo, &r.repo)?,
    };
    if let Some(path) = cache.repo(repo.clone()).get(&file) {
        return Ok(path);
    }
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| cache.token());
    let api = ApiBuilder::from_env().with_token(token).build().map_err(|e| hub_error("the hub", e))?;
    eprintln!("downloading {}:{file} into {}", r.repo, cache.path().display());
    let mut bar = Bar { bar: None, size: 0 };
    let path = api
        .repo(repo)
        .download_with_progress(&file, &mut bar)
        .map_err(|e| hub_error(&format!("downloading {}:{file}", r.repo), e))?;
    verify(&path, bar.size).inspect_err(|_| remove_file_and_blob(&path))?;
    Ok(path)
}

/// The one GGUF file of a repository (from the cache when it has one, else from the hub's file list).
fn only_gguf(cache: &Cache, repo: &Repo, name: &str) -> Result<String, Error> {
    let cached = snapshot_files(&cache.path().join(repo.folder_name()));
    let mut ggufs: Vec<String> = cached.into_iter().map(|(file, _)| file).filter(|f| f.ends_with(".gguf")).collect();
    if ggufs.is_empty() {
        let api = ApiBuilder::from_env().build().map_err(|e| hub_error("the hub", e))?;
        let info = api.repo(repo.clone()).info().map_err(|e| hub_error(&format!("listing {name}"), e))?;
        ggufs = info.siblings.into_iter().map(|s| s.rfilename).filter(|f| f.ends_with(".gguf")).collect();
    }
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::Invalid(format!("{name} has no .gguf file"))),
        many => {
            Err(Error::Invalid(format!("{name} has several .gguf files: name one ({name}:FILE): {}", many.join(", "))))
        }
    }
}

/// hf-hub's progress callbacks on an indicatif bar (drawn on stderr; hidden when it is not a terminal). The
/// size the hub announces is kept for the check after the download.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    size: u64,
}

impl Progress for &mut Bar {
    fn init(&mut self, size: usize, filename: &str) {
        self.size = size as u64;
        let style =
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                .expect("valid template");
        let bar = self.bar.get_or_insert_with(|| indicatif::ProgressBar::new(size as u64).with_style(style));
        bar.set_length(size as u64);
        bar.set_message(filename.to_owned());
    }

    fn update(&mut self, size: usize) {
        if let Some(b) = &self.bar {
            b.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The downloaded file has the announced size and, when the hub gave one (the blob is named by an LFS file's
/// SHA-256), that SHA-256.
fn verify(path: &Path, size: u64) -> Result<(), Error> {
    let blob = std::fs::canonicalize(path).map_err(|e| hub_error(&path.display().to_string(), e))?;
    let len = std::fs::metadata(&blob).map_err(|e| hub_error(&blob.display().to_string(), e))?.len();
    if len != size {
        return Err(Error::Invalid(format!("{}: {len} bytes downloaded, the hub announced {size}", path.display())));
    }
    let etag = blob.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if etag.len() != 64 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(()); // a small file kept in git: its ETag is a git hash, not a SHA-256
    }
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(&blob).map_err(|e| hub_error(&blob.display().to_string(), e))?;
    std::io::copy(&mut file, &mut hasher).map_err(|e| hub_error(&blob.display().to_string(), e))?;
    let sha: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if !sha.eq_ignore_ascii_case(&etag) {
        return Err(Error::Invalid(format!("{}: SHA-256 {sha}, the hub gave {etag} (deleted)", path.display())));
    }
    Ok(())
}

/// Removes a snapshot's link and the blob it points to.
fn remove_file_and_blob(link: &Path) {
    if let Ok(blob) = std::fs::canonicalize(link) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(link);
}

/// Every file of a cached repository's snapshots: its name in the repository and its path here.
fn snapshot_files(repo_dir: &Path) -> Vec<(String, PathBuf)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf)>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if let Ok(name) = path.strip_prefix(root) {
                out.push((name.to_string_lossy().into_owned(), path.clone()));
            }
        }
    }
    let mut out = Vec::new();
    for snapshot in std::fs::read_dir(repo_dir.join("snapshots")).into_iter().flatten().flatten() {
        walk(&snapshot.path(), &snapshot.path(), &mut out);
    }
    out.sort();
    out
}

/// The cached model repositories: their names and folders.
fn cached_repos(cache: &Cache) -> Vec<(String, PathBuf)> {
    let mut repos: Vec<(String, PathBuf)> = std::fs::read_dir(cache.path())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let repo = name.strip_prefix("models--")?.replacen("--", "/", 1);
            Some((repo, e.path()))
        })
        .collect();
    repos.sort();
    repos
}

#[derive(clap::Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    action: Option<ModelsAction>,
}

#[derive(clap::Subcommand)]
enum ModelsAction {
    /// List the cached files (the default): OWNER/REPO:FILE, size, path; downloads cut short are marked.
    List,
    /// Remove a cached file (OWNER/REPO:FILE), or every file of a repository (OWNER/REPO).
    Rm { name: String },
}

/// `bitnet models`.
pub fn models(a: ModelsArgs) -> Result<(), Error> {
    let cache = Cache::from_env();
    match a.action.unwrap_or(ModelsAction::List) {
        ModelsAction::List => {
            for (repo, dir) in cached_repos(&cache) {
                for (file, path) in snapshot_files(&dir) {
                    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                    println!("{repo}:{file}\t{}\t{}", human(size), path.display());
                }
                for entry in std::fs::read_dir(dir.join("blobs")).into_iter().flatten().flatten() {
                    if entry.path().extension().is_some_and(|e| e == "part") {
                        let size = entry.metadata().map_or(0, |m| m.len());
                        println!("{repo}\t(download cut short: {} so far, resumed by the next -hf)", human(size));
                    }
                }
            }
            Ok(())
        }
        ModelsAction::Rm { name } => remove(&cache, &name),
    }
}

fn remove(cache: &Cache, spec: &str) -> Result<(), Error> {
    let r = parse(spec)?;
    let dir = cache.path().join(Repo::model(r.repo.clone()).folder_name());
    if !dir.is_dir() {
        return Err(Error::Invalid(format!("{} is not in the cache ({})", r.repo, cache.path().display())));
    }
    let io = |e: std::io::Error| hub_error(&dir.display().to_string(), e);
    let Some(file) = r.file else {
        std::fs::remove_dir_all(&dir).map_err(io)?;
        eprintln!("removed {}", r.repo);
        return Ok(());
    };
    let links: Vec<PathBuf> = snapshot_files(&dir).into_iter().filter(|(f, _)| *f == file).map(|(_, p)| p).collect();
    if links.is_empty() {
        return Err(Error::Invalid(format!("{}:{file} is not in the cache", r.repo)));
    }
    links.iter().for_each(|link| remove_file_and_blob(link));
    if snapshot_files(&dir).is_empty() {
        std::fs::remove_dir_all(&dir).map_err(io)?;
    }
    eprintln!("removed {}:{file}", r.repo);
    Ok(())
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
