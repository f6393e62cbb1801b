//! Opening a model from the command line's flags: the engine's [`bitnet_engine::open`], with a progress
//! bar for big files.

use bitnet_engine::backend::DeviceOptions;
use bitnet_engine::model::LoadOptions;
use bitnet_engine::open::{self, OpenOptions};
use bitnet_engine::Error;

use crate::ModelArgs;

/// A model ready to run (the engine's [`open::Loaded`]), opened as the flags say.
pub struct Loaded(open::Loaded);

impl std::ops::Deref for Loaded {
    type Target = open::Loaded;
    fn deref(&self) -> &open::Loaded {
        &self.0
    }
}

impl Loaded {
    pub fn open(a: &ModelArgs) -> Result<Self, Error> {
        let bytes = open::open_bytes(a.model.as_deref())?;
        let opts = OpenOptions {
            ctx: a.ctx,
            load: LoadOptions { activation: a.activation },
            device: DeviceOptions { device: a.backend.into(), threads: a.threads, head: a.head, kv: a.kv_type },
        };
        let bar = (bytes.len() > 200 << 20).then(|| {
            let bar = indicatif::ProgressBar::new(1);
            bar.set_style(
                indicatif::ProgressStyle::with_template("loading {bar:40} {pos}/{len} {msg}").expect("valid template"),
            );
            bar
        });
        let mut progress = |done: usize, total: usize| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        };
        let loaded = open::Loaded::load(&bytes, &opts, &mut progress)?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok(Self(loaded))
    }
}

/// `bitnet info`: metadata, the choices the engine makes about the model, and the tensor table.
pub fn info(path: Option<&std::path::Path>) -> Result<(), Error> {
    let bytes = open::open_bytes(path)?;
    print!("{}", bitnet_engine::info::report(&bytes)?);
    Ok(())
}
