#!/usr/bin/perl

# Tests for sni_guard: workers that die.  A worker killed in the middle of a
# lookup takes only its own connection with it: the other worker keeps
# serving, the master starts a replacement, and the name is looked up again
# later.  Workers killed at random moments, and one caught holding the zone's
# lock, leave no deadlock: the master releases a dead worker's lock, and a
# zone left half-changed is emptied by the next worker, with a warning.

###############################################################################

use warnings;
use strict;

use Test::More;

use POSIX qw/ WNOHANG /;
use Time::HiRes qw/ time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ :all /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    sni_guard_zone guard:1m;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;
    sni_guard_timeout 5s;

    server {
        listen       127.0.0.1:8443 ssl;
        server_name  localhost;

        ssl_certificate     localhost.crt;
        ssl_certificate_key localhost.key;

        sni_guard on;

        location / {
            return 200 "name $ssl_server_name";
        }
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');

# Names the streams below use: a cached one, and new registered ones.
my @registered = ('shop.example.com', 'stuck.example.com', 'later.example.com',
	'after.example.com', map { my $s = $_; map { "r$s-$_.example.com" } 0 .. 99 } 1, 2);
lookup_conf($d, registered => \@registered);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

# nginx itself logs at alert level every worker that ends on a signal ("worker
# process N exited on signal 9"), and the master's release of a lock held by a
# dead worker ("shared memory zone ... was locked by N"): both are what this
# file does on purpose, not faults of the module.
$t->todo_alerts();

$t->plan(18)->run();

###############################################################################

my $port = port(8443);
my $lookup_port = port(8081);
my $ZONE_SIZE = 1048576;    # sni_guard_zone guard:1m
my $master = pid_in("$d/nginx.pid") or die "no nginx.pid";

# Clients forked by the test and not reaped yet; stopped if the test dies.
my %spawned;
my $main_pid = $$;

END {
	if ($$ == ($main_pid // 0)) {
		local $?;
		kill 'KILL', keys %spawned;
		waitpid($_, 0) for keys %spawned;
	}
}

# Forks $code; the child ends with _exit, so the test's END blocks run only in
# the test itself.
sub spawn {
	my ($code) = @_;
	my $pid = fork() // die "fork: $!";
	if ($pid) {
		$spawned{$pid} = 1;
		return $pid;
	}
	eval { $code->() };
	POSIX::_exit(0);
}

sub reap {
	my ($pid) = @_;
	wait_for(10, sub { waitpid($pid, WNOHANG) == $pid })
		or kill('KILL', $pid) && waitpid($pid, 0);
	delete $spawned{$pid};
}

sub append {
	my ($file, $line) = @_;
	open my $fh, '>>', $file or return;
	print $fh "$line\n";
	close $fh;
}

sub slurp {
	my ($file) = @_;
	open my $fh, '<', $file or return '';
	local $/;
	return <$fh> // '';
}

# The worker blocked in the lookup of $domain.  The lookup service logs the
# request with the pid of the process serving that connection, and the
# connection with its client port; the client end of that TCP connection (in
# /proc/net/tcp: local port = client port, remote port = the service's) has a
# socket inode, and the worker is the one process among the workers with a
# descriptor open on that inode.
sub worker_in_lookup {
	my ($domain) = @_;

	my ($request) = grep { ($_->{domain} // '') eq $domain } lookup_log($d);
	return undef unless $request;

	my ($client_port) = map { (split)[2] } grep { (split)[1] == $request->{pid} }
		split /\n/, slurp("$d/lookup.conns");
	return undef unless $client_port;

	my ($inode) = map { (split)[9] } grep {
		my @f = split;
		@f > 9 && $f[1] =~ /:([0-9A-F]{4})$/ && hex($1) == $client_port
			&& $f[2] =~ /:([0-9A-F]{4})$/ && hex($1) == $lookup_port;
	} split /\n/, slurp('/proc/net/tcp');
	return undef unless $inode;

	for my $pid (children($master)) {
		for my $fd (glob "/proc/$pid/fd/*") {
			return $pid if (readlink($fd) // '') eq "socket:[$inode]";
		}
	}
	return undef;
}

# How many times the module said it emptied the zone after a dead worker.
sub emptied {
	my $log = slurp("$d/error.log");
	my $n = () = $log =~ /sni_guard zone "guard" was left inconsistent .* emptied/g;
	return $n;
}

# Waits, for at most a second, until a process is in the stopped state.
sub stopped {
	my ($pid) = @_;
	for (1 .. 2000) {
		my ($state) = slurp("/proc/$pid/stat") =~ /.*\) (\S) /s or return 0;
		return 1 if $state eq 'T';
		select undef, undef, undef, 0.0005;
	}
	return 0;
}

# A reader of the zone's lock word, through the memory of a process that maps
# the zone: nginx maps shared memory from /dev/zero, and the zone is the one
# such mapping of its size.  Its slab pool starts with the lock, whose word
# holds the pid of the holder, or 0.  The reader returns undef when the word
# cannot be read.
sub lock_word {
	my ($pid) = @_;
	no warnings 'portable';    # 64-bit addresses

	my @zones = grep { $_->[2] =~ m{^/dev/zero} && $_->[1] - $_->[0] == $ZONE_SIZE }
		map {
			my ($from, $to, $path) = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$/;
			defined $path ? [ hex $from, hex $to, $path ] : ();
		} split /\n/, slurp("/proc/$pid/maps");
	return undef unless @zones == 1;

	open my $mem, '<:raw', "/proc/$pid/mem" or return undef;
	my $at = $zones[0][0];

	return sub {
		sysseek($mem, $at, 0) or return undef;
		(sysread($mem, my $word, 8) // 0) == 8 or return undef;
		return unpack('Q<', $word);
	};
}

sub served {
	my ($name, %opts) = @_;
	my $r = tls_get($port, $name, %opts);
	return ($r->{body} // '') eq "name $name" ? 'served'
		: 'failed: ' . ($r->{error} // $r->{reply} // '?');
}

# a worker killed in the middle of a lookup

is(served('shop.example.com'), 'served', 'a registered name is served and cached');

lookup_conf($d, mode => 'hang', registered => \@registered);

my $stuck = "$d/stuck.result";
my $client = spawn(sub {
	my $start = time();
	my $r = tls_get($port, 'stuck.example.com', timeout => 8);
	append($stuck, sprintf('%s %.3f %s', $r->{ok} ? 'ok' : 'failed',
		time() - $start, $r->{error} // ''));
});

my $blocked = wait_for(4, sub { worker_in_lookup('stuck.example.com') });
kill 'KILL', $blocked if $blocked;

ok($blocked, 'the worker blocked in the lookup was found and killed');

reap($client);
my ($outcome, $took) = split ' ', slurp($stuck);
is($outcome, 'failed', "killed worker's handshake: ended with the worker");
ok(defined $took && $took < 4.5, "killed worker's handshake: ended before the lookup timeout")
	or diag("took " . ($took // '?') . ' s');

my $start = time();
my @cached = map { served('shop.example.com', timeout => 3) } 1 .. 5;
my $elapsed = time() - $start;

is("@cached", join(' ', ('served') x 5), 'other worker: cached name served');
ok($elapsed < 3, 'other worker: at once') or diag("5 handshakes took $elapsed s");

my $replaced = wait_for(5, sub {
	my @now = children($master);
	@now == 2 && !grep { $_ == ($blocked // 0) } @now;
});
ok($replaced, 'the master started a replacement worker');

lookup_conf($d, registered => \@registered);

is(served('later.example.com') . ' ' . served('later.example.com'), 'served served',
	'service back: a new name is served');
is(lookup_count($d, 'later.example.com'), 1, 'service back: the new name looked up once');
is(served('stuck.example.com'), 'served', 'service back: the cut-short name is served');
is(lookup_count($d, 'stuck.example.com'), 2, 'service back: the cut-short name looked up again');

# workers killed at random moments, under a stream of handshakes for a
# cached name, new registered names and new unregistered names; each takes
# the zone's lock once or twice per handshake

my $stop = "$d/stream.stop";
my @streams = map {
	my $id = $_;
	spawn(sub {
		my $deadline = time() + 60;
		my $n = 0;
		for my $i (1 .. 50000) {
			last if -e $stop || time() > $deadline;
			my $name = $i % 4 == 0 ? 'shop.example.com'
				: $i % 4 == 1 ? "r$id-" . int($i / 4) % 100 . '.example.com'
				: "new$id-$i.example.com";
			client_hello($port, sni => $name, timeout => 2);
			$n++;
		}
		append("$d/stream.count", $n);
	});
} 1, 2;

my (@probes, @killed);
for my $round (1 .. 20) {
	select undef, undef, undef, 0.02 + rand(0.18);

	my @live = children($master);
	my $victim = $live[int rand @live] or last;
	kill 'KILL', $victim;
	push @killed, $victim;

	my $probe_start = time();
	my $r = served('shop.example.com', timeout => 5);
	push @probes, sprintf('%s %.3f', $r, time() - $probe_start);

	# wait for the replacement, so that the next kill has two to choose from
	wait_for(5, sub {
		my @now = children($master);
		@now == 2 && !grep { $_ == $victim } @now;
	});
}

my @done = grep { /^served / } @probes;
is(scalar @done, 20, 'kills: after each one a cached name is served')
	or diag(join "\n", @probes);

my ($slowest) = sort { $b <=> $a } map { (split)[1] } @probes;

# A random moment seldom falls while a worker holds the lock, so one worker
# is also caught holding it.  The lock word of the zone - the first word of
# its slab pool - holds the pid of the holder, or 0; it is read through the
# master's mapping of the zone.  When it names a worker, that worker is
# stopped (SIGSTOP); if the word still names it once it has stopped, it is
# killed, else let go on (SIGCONT).

my ($lookups_before, $emptied_before) = (lookup_count($d, 'shop.example.com'), emptied());

my ($caught, $tries, $reads) = (undef, 0, 0);
my $lock = lock_word($master);
my %workers = map { $_ => 1 } children($master);
my $deadline = time() + 30;

for my $i (1 .. 50_000_000) {
	last if $caught || $tries >= 2000 || !$lock;
	last if $i % 1000 == 0 && time() > $deadline;

	my $holder = $lock->();
	last unless defined $holder;
	next unless $holder;
	$reads++;
	if (!$workers{$holder}) {
		%workers = map { $_ => 1 } children($master);
		next;
	}

	$tries++;
	kill 'STOP', $holder;
	if (stopped($holder) && ($lock->() // 0) == $holder) {
		kill 'KILL', $holder;
		$caught = $holder;
	} else {
		kill 'CONT', $holder;
	}
}

ok($caught, 'a worker holding the zone lock was killed')
	or diag($lock ? "lock seen held $reads times, $tries workers stopped" : 'zone not found');
ok(wait_for(5, sub {
	slurp("$d/error.log") =~ /shared memory zone "guard" was locked by (\d+)/
		&& $1 == ($caught // 0);
}), 'lock holder killed: the master released the lock');

my $probe_start = time();
my $probe = served('shop.example.com', timeout => 5);
my $probe_took = time() - $probe_start;
is($probe, 'served', 'lock holder killed: a cached name is served');

my ($lookups_after, $emptied_after) = (lookup_count($d, 'shop.example.com'), emptied());
ok($lookups_after == $lookups_before || $emptied_after > $emptied_before,
	'lock holder killed: the answers were kept, or the zone emptied with a warning')
	or diag("lookups $lookups_before -> $lookups_after, no warning");

append($stop, 'stop');
reap($_) for @streams;

note(sprintf('%d workers killed at random, slowest probe after them %.3f s,'
	. ' zone emptied %d times; lock holder caught at the %d. stop, probe %.3f s;'
	. ' stream handshakes: %s',
	scalar @killed, $slowest // 0, $emptied_before, $tries, $probe_took,
	join(' + ', split /\n/, slurp("$d/stream.count"))));

is(served('after.example.com') . ' ' . served('after.example.com'), 'served served',
	'kills: a new name is served afterwards');
is(lookup_count($d, 'after.example.com'), 1, 'kills: the zone caches it');

my $locked = () = $t->read_file('error.log') =~ /shared memory zone "guard" was locked by/g;
note("the master released the zone's lock of a dead worker $locked times;"
	. ' the zone was found inconsistent and emptied ' . emptied() . ' times');

###############################################################################
