//! Data-parallel training (issue 19): the collective operations the loop needs, behind one trait.
//!
//! [`Single`] is one rank. [`InProcessGroup`] runs N ranks as threads of one process and sums in
//! rank order, so N ranks reproduce one rank with `train.grad_accum = N` exactly on the CPU (the
//! rank-equivalence tests rely on it). A multi-GPU implementation plugs in behind the same trait
//! (NCCL's all-reduce); it is not built yet.

use std::ops::AddAssign;
use std::sync::{Condvar, Mutex, MutexGuard};

use anyhow::{Result, bail};
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use crate::dms::DmsModel;
use crate::model::ParamSlot;
use crate::ops::attention::TrainBackend;

/// The error a rank gets when another rank failed (the other's error is the one to report).
#[derive(Debug)]
pub struct RankAborted;

impl std::fmt::Display for RankAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "another rank failed (its error is reported)")
    }
}

impl std::error::Error for RankAborted {}

/// What a rank needs of the others.
pub trait Collective: Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over the ranks (every rank receives the same values).
    fn all_reduce_f32(&self, values: &mut [f32]) -> Result<()>;
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Every rank's `mine` (lengths may differ), in rank order.
    fn all_gather_f32(&self, mine: &[f32]) -> Result<Vec<Vec<f32>>>;
    /// Tells the other ranks that this one failed: their waiting and later calls return an error
    /// instead of waiting forever.
    fn abort(&self);
}

/// One rank: every operation is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_f32(&self, mine: &[f32]) -> Result<Vec<Vec<f32>>> {
        Ok(vec![mine.to_vec()])
    }
    fn abort(&self) {}
}

/// N ranks as threads of one process; [`InProcessGroup::member`] is rank `r`'s handle.
pub struct InProcessGroup {
    world: usize,
    state: Mutex<GroupState>,
    arrived_all: Condvar,
}

#[derive(Default)]
struct GroupState {
    /// Completed rendezvous; a waiter leaves when it changes.
    generation: u64,
    arrived: usize,
    aborted: bool,
    f32_slots: Vec<Vec<f32>>,
    f64_slots: Vec<Vec<f64>>,
}

impl InProcessGroup {
    pub fn new(world: usize) -> Self {
        assert!(world >= 1, "a group has at least one rank");
        Self {
            world,
            state: Mutex::new(GroupState {
                f32_slots: vec![Vec::new(); world],
                f64_slots: vec![Vec::new(); world],
                ..Default::default()
            }),
            arrived_all: Condvar::new(),
        }
    }

    pub fn member(&self, rank: usize) -> InProcessRank<'_> {
        assert!(
            rank < self.world,
            "rank {rank} of a group of {}",
            self.world
        );
        InProcessRank { group: self, rank }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // A rank that panicked holding the lock left consistent data (slots are whole vectors).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every rank has arrived (or one aborted).
    fn rendezvous<'a>(
        &'a self,
        mut state: MutexGuard<'a, GroupState>,
    ) -> Result<MutexGuard<'a, GroupState>> {
        let generation = state.generation;
        state.arrived += 1;
        if state.arrived == self.world {
            state.arrived = 0;
            state.generation += 1;
            self.arrived_all.notify_all();
        }
        while state.generation == generation && !state.aborted {
            state = self
                .arrived_all
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        if state.aborted {
            return Err(RankAborted.into());
        }
        Ok(state)
    }

    /// Rank `rank` deposits `values`, waits for the others, sums every rank's in rank order,
    /// then waits again so that no rank overwrites its slot before all have read.
    fn all_reduce<T: Copy + AddAssign>(
        &self,
        rank: usize,
        values: &mut [T],
        slots: fn(&mut GroupState) -> &mut Vec<Vec<T>>,
    ) -> Result<()> {
        let mut state = self.lock();
        if state.aborted {
            return Err(RankAborted.into());
        }
        slots(&mut state)[rank] = values.to_vec();
        let mut state = self.rendezvous(state)?;
        let all = slots(&mut state);
        if let Some(r) = all.iter().position(|s| s.len() != values.len()) {
            let (mine, theirs) = (values.len(), all[r].len());
            drop(state);
            self.abort_all();
            bail!("ranks disagree on what they reduce: {mine} values here, {theirs} on rank {r}");
        }
        values.copy_from_slice(&all[0]);
        for other in &all[1..] {
            for (v, &o) in values.iter_mut().zip(other) {
                *v += o;
            }
        }
        self.rendezvous(state).map(drop)
    }

    fn all_gather(&self, rank: usize, mine: &[f32]) -> Result<Vec<Vec<f32>>> {
        let mut state = self.lock();
        if state.aborted {
            return Err(RankAborted.into());
        }
        state.f32_slots[rank] = mine.to_vec();
        let state = self.rendezvous(state)?;
        let all = state.f32_slots.clone();
        self.rendezvous(state).map(|_| all)
    }

    fn abort_all(&self) {
        let mut state = self.lock();
        state.aborted = true;
        self.arrived_all.notify_all();
    }
}

/// Rank `rank` of an [`InProcessGroup`].
pub struct InProcessRank<'g> {
    group: &'g InProcessGroup,
    rank: usize,
}

impl Collective for InProcessRank<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn all_reduce_f32(&self, values: &mut [f32]) -> Result<()> {
        self.group
            .all_reduce(self.rank, values, |s| &mut s.f32_slots)
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        self.group
            .all_reduce(self.rank, values, |s| &mut s.f64_slots)
    }
    fn all_gather_f32(&self, mine: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.group.all_gather(self.rank, mine)
    }
    fn abort(&self) {
        self.group.abort_all();
    }
}

/// Every parameter that trains, in the model's order: id, shape, device, dtype.
fn trainable_params<B: TrainBackend>(
    model: &mut DmsModel<B>,
) -> Vec<(ParamId, Vec<usize>, B::Device, burn::tensor::DType)> {
    let mut params = Vec::new();
    for (_, slot) in model.params_mut() {
        match slot {
            ParamSlot::Vector(p) if p.is_require_grad() => {
                let v = p.val();
                params.push((p.id, v.dims().to_vec(), v.device(), v.dtype()));
            }
            ParamSlot::Matrix(p) if p.is_require_grad() => {
                let v = p.val();
                params.push((p.id, v.dims().to_vec(), v.device(), v.dtype()));
            }
            _ => {}
        }
    }
    params
}

/// Sums every trainable parameter's gradient over the ranks, in one flat bucket (parameter order,
/// then a presence flag per parameter: a parameter no rank has a gradient for stays without one,
/// as on one rank). Every rank ends with the same gradients, so the replicas stay identical.
pub fn all_reduce_gradients<B: TrainBackend>(
    model: &mut DmsModel<B>,
    grads: &mut GradientsParams,
    collective: &dyn Collective,
) -> Result<()> {
    if collective.world() == 1 {
        return Ok(());
    }
    let params = trainable_params(model);
    let mut flat: Vec<f32> = Vec::new();
    let mut present: Vec<f32> = Vec::with_capacity(params.len());
    for (id, shape, _, _) in &params {
        let values = match shape.len() {
            1 => grads
                .remove::<B::InnerBackend, 1>(*id)
                .map(|g| g.into_data()),
            _ => grads
                .remove::<B::InnerBackend, 2>(*id)
                .map(|g| g.into_data()),
        };
        present.push(values.is_some() as u8 as f32);
        match values {
            Some(data) => flat.extend(data.convert::<f32>().into_vec::<f32>().map_err(|e| {
                anyhow::anyhow!("cannot read a gradient back for the all-reduce: {e:?}")
            })?),
            None => flat.extend(std::iter::repeat_n(0f32, shape.iter().product())),
        }
    }
    flat.extend_from_slice(&present);
    collective.all_reduce_f32(&mut flat)?;
    let (values, present) = flat.split_at(flat.len() - params.len());
    let mut offset = 0;
    for ((id, shape, device, dtype), &count) in params.iter().zip(present) {
        let len: usize = shape.iter().product();
        let data = TensorData::new(values[offset..offset + len].to_vec(), shape.clone());
        offset += len;
        if count == 0.0 {
            continue;
        }
        match shape.len() {
            1 => grads.register(
                *id,
                Tensor::<B::InnerBackend, 1>::from_data(data, device).cast(*dtype),
            ),
            _ => grads.register(
                *id,
                Tensor::<B::InnerBackend, 2>::from_data(data, device).cast(*dtype),
            ),
        }
    }
    Ok(())
}

/// ZeRO-1 style optimizer sharding (`run.shard_optimizer`): each trainable parameter belongs to
/// one rank, which alone keeps its AdamW moments and updates it; the others receive its new value.
/// AdamW treats parameters independently, so the weights are those of an unsharded run.
pub struct ParamOwners {
    /// Each trainable parameter's owning rank.
    owner_of: std::collections::HashMap<ParamId, usize>,
    rank: usize,
}

impl ParamOwners {
    /// Assigns each trainable parameter, largest first, to the rank with the fewest elements so
    /// far (ties to the lower rank): the same assignment on every rank.
    pub fn new<B: TrainBackend>(model: &mut DmsModel<B>, rank: usize, world: usize) -> Self {
        let mut by_size: Vec<(usize, ParamId, usize)> = trainable_params(model)
            .into_iter()
            .enumerate()
            .map(|(index, (id, shape, _, _))| (index, id, shape.iter().product()))
            .collect();
        by_size.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        let mut load = vec![0usize; world];
        let mut owner_of = std::collections::HashMap::new();
        for (_, id, size) in by_size {
            let r = (0..world)
                .min_by_key(|&r| (load[r], r))
                .expect("world >= 1");
            load[r] += size;
            owner_of.insert(id, r);
        }
        Self { owner_of, rank }
    }

    pub fn owns(&self, id: &ParamId) -> bool {
        self.owner_of.get(id) == Some(&self.rank)
    }

    /// Drops the gradients of the parameters another rank updates.
    pub fn keep_own_gradients<B: TrainBackend>(
        &self,
        model: &mut DmsModel<B>,
        grads: &mut GradientsParams,
    ) {
        for (_, slot) in model.params_mut() {
            match slot {
                ParamSlot::Vector(p) if !self.owns(&p.id) => {
                    grads.remove::<B::InnerBackend, 1>(p.id);
                }
                ParamSlot::Matrix(p) if !self.owns(&p.id) => {
                    grads.remove::<B::InnerBackend, 2>(p.id);
                }
                _ => {}
            }
        }
    }

    /// After the optimizer step: every rank's updated parameters to every rank.
    pub fn share_updates<B: TrainBackend>(
        &self,
        model: &mut DmsModel<B>,
        collective: &dyn Collective,
    ) -> Result<()> {
        let mut mine = Vec::new();
        for (_, slot) in model.params_mut() {
            let data = match slot {
                ParamSlot::Vector(p) if self.owns(&p.id) => p.val().into_data(),
                ParamSlot::Matrix(p) if self.owns(&p.id) => p.val().into_data(),
                _ => continue,
            };
            mine.extend(
                data.convert::<f32>().into_vec::<f32>().map_err(|e| {
                    anyhow::anyhow!("cannot read a parameter back to share it: {e:?}")
                })?,
            );
        }
        let all = collective.all_gather_f32(&mine)?;
        let mut offsets = vec![0usize; all.len()];
        for (_, slot) in model.params_mut() {
            let (id, shape) = match &slot {
                ParamSlot::Vector(p) => (p.id, p.val().dims().to_vec()),
                ParamSlot::Matrix(p) => (p.id, p.val().dims().to_vec()),
            };
            let Some(&owner) = self.owner_of.get(&id) else {
                continue;
            };
            let len: usize = shape.iter().product();
            let start = offsets[owner];
            offsets[owner] += len;
            if owner == self.rank {
                continue;
            }
            let values = all[owner].get(start..start + len).ok_or_else(|| {
                anyhow::anyhow!("rank {owner} shared fewer parameter values than it owns")
            })?;
            let data = TensorData::new(values.to_vec(), shape);
            match slot {
                ParamSlot::Vector(p) => crate::run::snapshot::replace(p, data),
                ParamSlot::Matrix(p) => crate::run::snapshot::replace(p, data),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_all_reduce_sums_in_rank_order_on_every_rank() {
        let group = InProcessGroup::new(3);
        let results: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    let member = group.member(r);
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for round in 0..5 {
                            let mut v = vec![r as f64 + round as f64, 10.0 * r as f64];
                            member.all_reduce_f64(&mut v).unwrap();
                            out.extend(v);
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in &results {
            assert_eq!(r, &results[0]);
        }
        assert_eq!(&results[0][..2], &[3.0, 30.0]);
        assert_eq!(&results[0][8..], &[15.0, 30.0]);
    }

    #[test]
    fn a_failed_rank_releases_the_others_with_an_error() {
        let group = InProcessGroup::new(2);
        let waiting = std::thread::scope(|s| {
            let other = group.member(1);
            let h = s.spawn(move || other.all_reduce_f32(&mut [1.0]));
            std::thread::sleep(std::time::Duration::from_millis(50));
            group.member(0).abort();
            h.join().unwrap()
        });
        let err = waiting.unwrap_err();
        assert!(format!("{err}").contains("another rank failed"), "{err}");
        assert!(group.member(0).all_reduce_f32(&mut [1.0]).is_err());
    }

    #[test]
    fn mismatched_lengths_are_an_error_on_every_rank() {
        let group = InProcessGroup::new(2);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|r| {
                    let member = group.member(r);
                    s.spawn(move || member.all_reduce_f32(&mut vec![1.0; r + 1]))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r.is_err()));
    }
}
