//! Hosts in network namespaces, for tests of what crosses a network: every host has a data
//! link to one switch (a bridge in a namespace of its own) and a management link to another,
//! and the test's own namespace joins both. Cutting a host's data port partitions it from the
//! others and from the registry while the test still reaches its HTTP API over management.
//! Needs root and iproute2; [`Network::create`] says why not otherwise. Dropping the network
//! deletes every namespace and link it made.

use std::net::IpAddr;
use std::process::Command;

use crate::process::NetnsHost;

/// A switch and `hosts` namespaces on it.
pub struct Network {
    prefix: String,
    hosts: usize,
    data: u8,
    made: Vec<String>,
}

impl Network {
    /// Makes the network, or says why it cannot be made here.
    pub fn create(hosts: usize) -> Result<Network, String> {
        if !crate::postgres::is_root() {
            return Err("network namespaces need root".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Err("network namespaces need iproute2's `ip`".into());
        }
        // Names of at most 15 characters, unique to this process; subnets picked at random.
        let prefix = format!("sp{}", std::process::id() % 100_000);
        let mut network = Network { prefix, hosts, data: rand::random_range(1..=250), made: Vec::new() };
        network.build().map(|()| network)
    }

    fn build(&mut self) -> Result<(), String> {
        let p = self.prefix.clone();
        let switch = format!("{p}sw");
        self.add_netns(&switch)?;
        for bridge in ["data", "mgmt"] {
            ip(&["-n", &switch, "link", "add", bridge, "type", "bridge"])?;
            ip(&["-n", &switch, "link", "set", bridge, "up"])?;
        }
        // The test's own namespace on both bridges.
        for (bridge, ip_addr) in [("data", self.data_ip(254)), ("mgmt", self.mgmt_ip(254))] {
            let (outer, inner) = (format!("{p}{}", &bridge[..1]), format!("{p}{}x", &bridge[..1]));
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &switch])?;
            ip(&["-n", &switch, "link", "set", &inner, "master", bridge, "up"])?;
            ip(&["addr", "add", &format!("{ip_addr}/24"), "dev", &outer])?;
            ip(&["link", "set", &outer, "up"])?;
        }
        for i in 1..=self.hosts {
            let host = self.netns(i);
            self.add_netns(&host)?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
            for (bridge, name, ip_addr) in [("data", "eth0", self.data_ip(i)), ("mgmt", "mgmt0", self.mgmt_ip(i))] {
                let port = self.port(i, bridge);
                let temp = format!("{p}t{i}{}", &bridge[..1]);
                ip(&["link", "add", &port, "type", "veth", "peer", "name", &temp])?;
                ip(&["link", "set", &port, "netns", &switch])?;
                ip(&["-n", &switch, "link", "set", &port, "master", bridge, "up"])?;
                ip(&["link", "set", &temp, "netns", &host])?;
                ip(&["-n", &host, "link", "set", &temp, "name", name])?;
                ip(&["-n", &host, "addr", "add", &format!("{ip_addr}/24"), "dev", name])?;
                ip(&["-n", &host, "link", "set", name, "up"])?;
            }
        }
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.made.push(name.to_string());
        Ok(())
    }

    fn netns(&self, host: usize) -> String {
        format!("{}h{host}", self.prefix)
    }

    fn port(&self, host: usize, bridge: &str) -> String {
        format!("{}h{host}{}", self.prefix, &bridge[..1])
    }

    /// The address of host `i` (1-based; 254 is the test's own) on the data network.
    pub fn data_ip(&self, i: usize) -> IpAddr {
        IpAddr::from([10, 201, self.data, i as u8])
    }

    /// The address of host `i` on the management network.
    pub fn mgmt_ip(&self, i: usize) -> IpAddr {
        IpAddr::from([10, 202, self.data, i as u8])
    }

    /// Where an agent on host `i` runs and listens.
    pub fn host(&self, i: usize) -> NetnsHost {
        NetnsHost { netns: self.netns(i), api_ip: self.mgmt_ip(i), data_ip: self.data_ip(i) }
    }

    /// Cuts host `i` off the data network: no packet reaches it or leaves it.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &format!("{}sw", self.prefix), "link", "set", &self.port(i, "data"), "down"]).expect("cut the host's data port");
    }

    /// Joins host `i` to the data network again.
    pub fn heal(&self, i: usize) {
        ip(&["-n", &format!("{}sw", self.prefix), "link", "set", &self.port(i, "data"), "up"]).expect("restore the host's data port");
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links, and a veth goes with its peer.
        for name in self.made.iter().rev() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}
