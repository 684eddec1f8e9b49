//! Uprobes on user libraries, attached per (library, process): the CUDA step clock
//! (`cuda.rs`) and TLS plaintext (`tls.rs`). A family is a table of (symbol, program) pairs;
//! its programs are loaded on its first attach, and a symbol the library lacks is skipped.

use std::{
    collections::BTreeMap,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use aya::programs::{
    UProbe,
    uprobe::{UProbeLinkId, UProbeScope},
};

use super::{ProbeError, Probes};
use crate::ids::Pid;

/// A family of uprobes: what it hooks, and its name in errors.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    /// (symbol, program) pairs; a symbol may appear twice (entry and return programs).
    pub symbols: &'static [(&'static str, &'static str)],
    /// Every program of `symbols`, each once.
    pub programs: &'static [&'static str],
}

/// A library and the process it is probed for (`None`: every process).
pub type Site = (PathBuf, Option<Pid>);

/// One family's attached uprobes, per library and process.
#[derive(Debug, Default)]
pub(super) struct Links {
    /// (library, process) → (program, link) per attached symbol.
    attached: BTreeMap<Site, Vec<(&'static str, UProbeLinkId)>>,
    loaded: bool,
}

impl Probes {
    fn uprobe(&mut self, name: &'static str) -> Result<&mut UProbe, ProbeError> {
        self.ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingProgram(name))?
            .try_into()
            .map_err(|source| ProbeError::Program { name, source })
    }

    fn links(&mut self, family: &Family) -> &mut Links {
        self.uprobes.entry(family.name).or_default()
    }

    /// Attaches `family` to every symbol of its table that `library` exports, for `pid` (or
    /// every process using the library when `None`; the programs still keep to targets).
    /// Returns how many were attached; attaching the same (library, process) twice is a no-op
    /// that returns 0. No symbol attached at all is an error (the last symbol's).
    pub(super) fn attach_family(
        &mut self,
        family: &'static Family,
        library: &Path,
        pid: Option<Pid>,
    ) -> Result<usize, ProbeError> {
        let key = (library.to_path_buf(), pid);
        if self.links(family).attached.contains_key(&key) {
            return Ok(0);
        }
        if !self.links(family).loaded {
            for &name in family.programs {
                self.uprobe(name)?
                    .load()
                    .map_err(|source| ProbeError::Program { name, source })?;
            }
            self.links(family).loaded = true;
        }
        let scope = match pid.and_then(|p| NonZeroU32::new(p.0)) {
            Some(p) => UProbeScope::OneProcess(p),
            None => UProbeScope::AllProcesses,
        };
        let mut links = Vec::new();
        let mut last_error = None;
        for &(symbol, name) in family.symbols {
            match self.uprobe(name)?.attach(symbol, library, scope) {
                Ok(link) => links.push((name, link)),
                Err(e) => {
                    tracing::debug!("{}: {symbol} not attached: {e}", library.display());
                    last_error = Some((name, e));
                }
            }
        }
        if links.is_empty() {
            let name = family.programs.first().copied().unwrap_or(family.name);
            return Err(ProbeError::Library {
                family: family.name,
                library: library.to_path_buf(),
                source: Box::new(match last_error {
                    Some((name, source)) => ProbeError::Program { name, source },
                    None => ProbeError::MissingProgram(name),
                }),
            });
        }
        let n = links.len();
        self.links(family).attached.insert(key, links);
        Ok(n)
    }

    /// Detaches `family` from a process (every library), e.g. when it exited. Returns how
    /// many uprobes were detached.
    pub(super) fn detach_family(
        &mut self,
        family: &'static Family,
        pid: Pid,
    ) -> Result<usize, ProbeError> {
        let keys: Vec<Site> = self
            .links(family)
            .attached
            .keys()
            .filter(|(_, p)| *p == Some(pid))
            .cloned()
            .collect();
        let mut n = 0;
        for key in keys {
            let links = self.links(family).attached.remove(&key).unwrap_or_default();
            for (name, link) in links {
                self.uprobe(name)?
                    .detach(link)
                    .map_err(|source| ProbeError::Program { name, source })?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The (library, process) pairs `family` is attached to.
    pub(super) fn family_attached(&self, family: &Family) -> Vec<Site> {
        self.uprobes
            .get(family.name)
            .map(|l| l.attached.keys().cloned().collect())
            .unwrap_or_default()
    }
}
