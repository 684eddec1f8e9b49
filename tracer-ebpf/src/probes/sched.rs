//! Process lifecycle: follow targets' children, comm matches, exits.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::{info, warn};
use tracer_ebpf::abi::{
    COMM_LEN, EXEC_FLAG_COMM_MATCH, EXIT_FLAG_THREAD, Kind, ProcEvent, Stat, TARGET_CHILD,
    TARGET_COMM,
};

use super::{
    COMMS, TARGETS, bump, current_target, emit, forget_traced, header, insert_target, may_be_traced,
};

#[inline(always)]
fn proc_event(kind: Kind, id: u64, flags: u16, pid: u32, ppid: u32) {
    let ev = ProcEvent {
        hdr: header(kind, id, flags),
        pid,
        ppid,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    emit(kind, &ev);
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    // Runs in the parent. Threads fire this too; their entries are removed when they exit.
    let id = bpf_get_current_pid_tgid();
    let parent = (id >> 32) as u32;
    // SAFETY: presence check only.
    if !may_be_traced(parent) || unsafe { TARGETS.get(parent) }.is_none() {
        return 0;
    }
    // SAFETY: sched_process_fork: child_pid at offset 20.
    let child = unsafe { *(ctx.as_ptr().cast::<u8>().add(20).cast::<i32>()) } as u32;
    if !insert_target(child, TARGET_CHILD, BPF_NOEXIST) {
        // SAFETY: presence check only.
        if unsafe { TARGETS.get(child) }.is_none() {
            bump(Stat::TargetTableFull as u32);
            warn!(
                &ctx,
                "target map full: child {} of {} not followed", child, parent
            );
            return 0;
        }
    }
    proc_event(Kind::ProcFork, id, 0, child, parent);
    0
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if current_target().is_some() {
        proc_event(Kind::ProcExec, id, 0, tgid, 0);
        return 0;
    }
    if config!(filter_comm) == 0 || tgid == config!(self_tgid) {
        return 0;
    }
    let Ok(comm) = bpf_get_current_comm() else {
        return 0;
    };
    // SAFETY: presence check only.
    if unsafe { COMMS.get(comm) }.is_none() {
        return 0;
    }
    if !insert_target(tgid, TARGET_COMM, BPF_ANY) {
        bump(Stat::TargetTableFull as u32);
        return 0;
    }
    info!(&ctx, "process {} became a target by its name", tgid);
    proc_event(Kind::ProcExec, id, EXEC_FLAG_COMM_MATCH, tgid, 0);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let tid = id as u32;
    if tid != tgid && may_be_traced(tid) {
        // A thread: drop the entry its creation added (its number's byte was set then), and
        // say so (userspace followed it too). No process has its number while it lives.
        if TARGETS.remove(tid).is_ok() {
            proc_event(Kind::ProcExit, id, EXIT_FLAG_THREAD, tid, 0);
        }
        forget_traced(tid);
        // It may also be the process's last thread (the leader exited first): go on.
    }
    // SAFETY: sched_process_exit: group_dead (bool) at offset 32.
    let group_dead = unsafe { *(ctx.as_ptr().cast::<u8>().add(32)) };
    if group_dead == 0 {
        return 0;
    }
    let target = current_target().is_some();
    forget_traced(tgid);
    if !target {
        return 0;
    }
    let _ = TARGETS.remove(tgid);
    proc_event(Kind::ProcExit, id, 0, tgid, 0);
    0
}
