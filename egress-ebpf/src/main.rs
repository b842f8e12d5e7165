//! egress kernel programs.
//!
//! `sock_addr` judges TCP and UDP at the system call (connect, sendmsg) so refused flows fail at
//! once with EPERM; `skb` is the per-packet backstop for everything else that leaves a socket of
//! a covered cgroup (raw sockets, ICMP), learns UDP peers on ingress and counts every flow's
//! packets both ways (`flows`); `socket` refuses the
//! sockets those hooks cannot see. All share the policy lookup in `policy`.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod destination;
mod dns;
mod events;
mod flows;
mod maps;
mod policy;
mod recent;
mod ret;
mod skb;
mod skb_count;
mod sock_addr;
mod socket;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
