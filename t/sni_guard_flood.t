#!/usr/bin/perl

# Tests for sni_guard: a flood of invented names against a lookup budget.  With
# sni_guard_lookup_rate, misses over the budget are refused at once with
# internal_error (80), without a lookup and without a line above info, while
# handshakes for names already cached go on untouched.  With per_client, one
# client address cannot spend the whole budget: another address still gets its
# new names looked up while the first one floods.

###############################################################################

use warnings;
use strict;

use Test::More;

use POSIX qw/ ceil WNOHANG /;
use Time::HiRes qw/ time sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ :all /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

eval { require IO::Socket::SSL; };
plan(skip_all => 'IO::Socket::SSL not installed') if $@;

# The second client address; all of 127/8 is loopback on Linux.
my $other = '127.0.0.2';
plan(skip_all => "cannot bind $other")
	unless IO::Socket::INET->new(LocalAddr => "$other:0", Proto => 'tcp');

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard on;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;

    # one budget for everybody; reuseport spreads the flood over both workers,
    # which share the budget
    server {
        listen       127.0.0.1:8443 ssl reuseport;
        server_name  localhost;

        sni_guard_zone        budget:1m;
        sni_guard_lookup_rate 20r/s burst=10;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    # a budget with a share per client address
    server {
        listen       127.0.0.1:8444 ssl reuseport;
        server_name  localhost;

        sni_guard_zone        shares:1m;
        sni_guard_lookup_rate 50r/s burst=10 per_client=5r/s;

        location / {
            return 200 "name $ssl_server_name";
        }
    }
}

EOF

# Flood settings: processes, seconds, and a cap on handshakes per process.
my ($FLOODERS, $FLOOD_TIME, $FLOOD_MAX) = (4, 3, 20000);

# The budgets, as configured above.
my ($RATE, $BURST) = (20, 10);
my ($SHARED_RATE, $CLIENT_RATE, $SHARED_BURST) = (50, 5, 10);

# Admissions a leaky bucket allows beyond rate x time, besides the burst: the
# first request of an empty bucket is never excess (as with limit_req), and
# one more for the clock edges - nginx decides on its cached millisecond clock,
# which may run a little behind the moments measured here.
my $EDGES = 2;

my @cached = map { "shop$_.example.com" } 1 .. 5;
my @fresh = map { "new$_.example.com" } 1 .. 40;

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ @cached, @fresh ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(15)->run();

###############################################################################

my ($port, $shared) = (port(8443), port(8444));

# Forks a child that runs $code and leaves without running the test's END
# blocks; returns its pid.
sub spawn {
	my ($code) = @_;
	my $pid = fork();
	die "Can't fork: $!\n" unless defined $pid;
	if ($pid == 0) {
		eval { $code->(); 1 } or print STDERR "child $$: $@";
		POSIX::_exit(0);
	}
	return $pid;
}

# Waits for the children until $seconds have passed, then stops the rest.
sub reap {
	my ($seconds, @pids) = @_;
	my %left = map { $_ => 1 } @pids;
	my $deadline = time() + $seconds;
	for my $sig (undef, 'TERM', 'KILL') {
		kill $sig, keys %left if defined $sig && %left;
		while (%left && time() < $deadline) {
			delete $left{$_} for grep { waitpid($_, WNOHANG) != 0 } keys %left;
			sleep 0.02 if %left;
		}
		last unless %left;
		$deadline = time() + 3;
	}
	return scalar keys %left;
}

sub write_atomic {
	my ($path, $text) = @_;
	open my $fh, '>', "$path.tmp" or die "Can't write $path.tmp: $!\n";
	print $fh $text;
	close $fh;
	rename "$path.tmp", $path or die "Can't rename $path.tmp: $!\n";
}

sub read_lines {
	my ($path) = @_;
	open my $fh, '<', $path or return ();
	chomp(my @lines = <$fh>);
	close $fh;
	return @lines;
}

# One flooding process: distinct invented names as fast as it can, from $go
# for $FLOOD_TIME seconds or $FLOOD_MAX handshakes.  Writes its first and last
# moments, the handshakes sent, those refused with 80, and any other outcome.
sub flood {
	my ($port, $tag, $k, $go) = @_;

	# On a small machine the flooders would otherwise starve the probing
	# client itself, and its latencies would say little about nginx.
	setpriority(0, 0, 10);
	srand();    # forked copies would otherwise send the same random bytes

	my $wait = $go - time();
	sleep $wait if $wait > 0;

	my ($start, $sent, $refused, @odd) = (time(), 0, 0);
	while ($sent < $FLOOD_MAX && time() < $go + $FLOOD_TIME) {
		my $name = "n$sent.p$k.$tag.flood.example";
		my $r = client_hello($port, sni => $name);
		$sent++;
		if ($r->{outcome} eq 'alert' && $r->{alert} == 80) {
			$refused++;
		} else {
			push @odd, "$name $r->{outcome} " . ($r->{alert} // $r->{error} // '');
		}
	}
	my $end = time();

	write_atomic("$d/$tag.$k", join("\n", "$start $end $sent $refused", @odd) . "\n");
}

# Starts $FLOODERS flooding processes that begin together; returns their pids.
sub start_flood {
	my ($port, $tag) = @_;
	my $go = time() + 0.3;
	return map { my $k = $_; spawn(sub { flood($port, $tag, $k, $go) }) } 1 .. $FLOODERS;
}

# What the flooders did: the measured flood time, the names they sent, the
# handshakes refused with 80, and the other outcomes.
sub flood_results {
	my ($tag) = @_;
	my ($first, $last, $refused, @names, @odd);
	for my $k (1 .. $FLOODERS) {
		my ($head, @rest) = read_lines("$d/$tag.$k");
		my ($start, $end, $sent, $ok) = split ' ', $head // '';
		next unless defined $ok;
		$first = $start if !defined $first || $start < $first;
		$last = $end if !defined $last || $end > $last;
		$refused += $ok;
		push @names, map { "n$_.p$k.$tag.flood.example" } 0 .. $sent - 1;
		push @odd, @rest;
	}
	return {
		time => defined $first ? $last - $first : 0,
		from => $first // 0, to => $last // 0,
		names => \@names, refused => $refused // 0, odd => \@odd,
	};
}

# A full handshake and a request from the local address $from.  The shared
# tls_get always connects from 127.0.0.1, so this one is built here.
sub tls_get_from {
	my ($from, $port, $name) = @_;
	my $s = IO::Socket::SSL->new(
		PeerAddr => '127.0.0.1', PeerPort => $port, LocalAddr => $from,
		Proto => 'tcp', Timeout => 5,
		SSL_hostname => $name,
		SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_NONE(),
	) or return { ok => 0, error => $IO::Socket::SSL::SSL_ERROR || "$!" };

	$s->print("GET / HTTP/1.0\r\nHost: $name\r\n\r\n");
	my $reply = '';
	my $deadline = time() + 5;
	while (time() < $deadline) {
		my $n = $s->sysread(my $chunk, 16384);
		last unless $n;
		$reply .= $chunk;
	}
	$s->close(SSL_fast_shutdown => 1);
	my ($body) = $reply =~ /\r\n\r\n(.*)\z/s;
	return { ok => 1, body => $body };
}

# Lines of error.log written since the file had $offset bytes.  Read without
# $t: a named sub that holds $t keeps it alive until global destruction, too
# late for the harness's closing checks.
sub log_since {
	my ($offset) = @_;
	open my $fh, '<', "$d/error.log" or die "Can't open $d/error.log: $!\n";
	seek $fh, $offset, 0;
	local $/;
	return split /\n/, <$fh> // '';
}

sub p99 {
	my @sorted = sort { $a <=> $b } @_;
	return @sorted ? $sorted[ceil(0.99 * @sorted) - 1] : 0;
}

###############################################################################

# the registered names are cached before the flood

my $warm = grep { (tls_get($port, $_)->{body} // '') eq "name $_" } @cached;

lookup_clear($d);
my $log_offset = -s "$d/error.log";

# A prober does full handshakes for the cached names every 20 ms while the
# flood runs, until told to stop (bounded in count and time as well).
my $stop = "$d/probe.stop";
my $prober = spawn(sub {
	my ($i, @records) = (0);
	my $deadline = time() + $FLOOD_TIME + 15;
	while ($i < 2000 && time() < $deadline && !-e $stop) {
		my $name = $cached[$i++ % @cached];
		my $began = time();
		my $r = tls_get($port, $name);
		my $took = time() - $began;
		my $ok = ($r->{body} // '') eq "name $name" ? 'ok' : 'failed';
		push @records, sprintf('%.4f %.4f %s %s %s', $began, $took, $ok, $name,
			$r->{error} // $r->{read_error} // '');
		my $pause = $began + 0.02 - time();
		sleep $pause if $pause > 0;
	}
	write_atomic("$d/probe", join("\n", @records) . "\n");
});

my @flooders = start_flood($port, 'a');
reap($FLOOD_TIME + 30, @flooders);
write_atomic($stop, '');
reap(20, $prober);

my $f = flood_results('a');
my @names = @{$f->{names}};
my $sent = @names;
my $bound = $RATE * $f->{time} + $BURST + $EDGES;
my @looked = lookup_log($d);
my %looked_up = map { $_->{domain} => 1 } grep { defined $_->{domain} } @looked;
my @log = log_since($log_offset);

my %over;
for (@log) {
	$over{$1}++ if /\[info\] .*sni_guard refused "([^"]+)": over the lookup budget/;
}

diag(sprintf('flood: %d handshakes in %.2f s, %d refused with 80, %d lookups, '
	. '%d over the budget; budget bound %.1f', $sent, $f->{time}, $f->{refused},
	scalar @looked, scalar keys %over, $bound));

# the budget held

is($warm, scalar @cached, 'registered names served and cached before the flood');
cmp_ok($sent, '>=', 10 * $bound, "the flood was far over the budget: $sent handshakes");
cmp_ok(scalar @looked, '<=', $bound,
	sprintf('lookups during the flood within rate x %.2f s + burst', $f->{time}));
cmp_ok(scalar @looked, '>=', $RATE / 2 * $f->{time},
	'the budget was spent: at least half the rate was looked up');

# every flood handshake was refused, most of them without a lookup

is($f->{refused}, $sent, 'every flood handshake refused with internal_error (80)')
	or diag(join "\n", @{$f->{odd}}[0 .. ($#{$f->{odd}} < 9 ? $#{$f->{odd}} : 9)]);

my @neither = grep { !$looked_up{$_} && !$over{$_} } @names;
my @both = grep { $looked_up{$_} && $over{$_} } @names;
is(scalar(@neither) + scalar(@both), 0,
	'each flood name either looked up or refused over the budget, never both')
	or diag("neither: @neither[0 .. ($#neither < 4 ? $#neither : 4)]; "
		. "both: @both[0 .. ($#both < 4 ? $#both : 4)]");

my $over_flood = grep { $over{$_} } @names;
cmp_ok($over_flood, '>', $sent / 2,
	"most flood handshakes refused without a lookup: $over_flood of $sent");

# the log says why, at info, and nothing louder per handshake

my @loud = grep { /\[(warn|error|crit|alert|emerg)\]/ } @log;
cmp_ok(scalar @loud, '<=', 5,
	'no line at warn or above per flood handshake: ' . scalar(@loud) . " for $sent")
	or diag(join "\n", @loud[0 .. ($#loud < 9 ? $#loud : 9)]);

# the cached names were served all along

my @probes = map { [ split / /, $_, 5 ] } read_lines("$d/probe");
my @during = grep { $_->[0] >= $f->{from} && $_->[0] + $_->[1] <= $f->{to} } @probes;
my @failed = grep { $_->[2] ne 'ok' } @probes;

cmp_ok(scalar @during, '>=', 10,
	'handshakes for cached names interleaved with the flood: ' . scalar @during);
is(scalar @failed, 0, 'every handshake for a cached name completed: '
	. (@probes - @failed) . ' of ' . scalar @probes)
	or diag(join "\n", map { "@$_" } @failed[0 .. ($#failed < 9 ? $#failed : 9)]);
is(scalar(grep { $looked_up{$_} } @cached), 0, 'cached names not looked up again');

my @took = sort { $a <=> $b } map { $_->[1] } @during;
my @calm = sort { $a <=> $b } map { $_->[1] } grep { $_->[0] + $_->[1] < $f->{from} } @probes;
diag(sprintf('cached names during the flood: p99 %.1f ms, max %.1f ms over %d handshakes '
	. '(before it: p99 %.1f ms over %d)', 1000 * p99(@took), 1000 * ($took[-1] // 0),
	scalar @took, 1000 * p99(@calm), scalar @calm));

###############################################################################

# per_client: one address floods, another still gets its new names looked up

lookup_clear($d);

$stop = "$d/share.stop";
my $sharer = spawn(sub {
	my ($i, @records) = (0);
	my $deadline = time() + $FLOOD_TIME + 15;
	sleep 0.4;    # the flood is under way
	while ($i < @fresh && time() < $deadline && !-e $stop) {
		my $name = $fresh[$i++];
		my $began = time();
		my $r = tls_get_from($other, $shared, $name);
		my $ok = ($r->{body} // '') eq "name $name" ? 'ok' : 'failed';
		push @records, sprintf('%.4f %s %s %s', $began, $ok, $name, $r->{error} // '');
		my $pause = $began + 0.3 - time();
		sleep $pause if $pause > 0;
	}
	write_atomic("$d/share", join("\n", @records) . "\n");
});

@flooders = start_flood($shared, 'b');
reap($FLOOD_TIME + 30, @flooders);
write_atomic($stop, '');
reap(20, $sharer);

$f = flood_results('b');
@names = @{$f->{names}};
$sent = @names;

my %count;
$count{$_->{domain}}++ for grep { defined $_->{domain} } lookup_log($d);

my @shares = map { [ split / /, $_, 4 ] } read_lines("$d/share");
my @served = grep { $_->[1] eq 'ok' && ($count{$_->[2]} // 0) == 1 } @shares;
my $flooder = grep { $count{$_} } @names;
my $client_bound = $CLIENT_RATE * $f->{time} + $SHARED_BURST + $EDGES;

diag(sprintf('per_client flood: %d handshakes in %.2f s from 127.0.0.1, %d looked up; '
	. '%d of %d names from %s served', $sent, $f->{time}, $flooder,
	scalar @served, scalar @shares, $other));

my @amid = grep { $_->[0] >= $f->{from} && $_->[0] <= $f->{to} } @shares;

ok($sent >= 10 * $client_bound && $f->{refused} == $sent,
	"the flooding address sent far more than its share, all refused with 80: $sent");
cmp_ok(scalar @amid, '>=', 5, "new names asked from $other during the flood: "
	. scalar @amid);
is(scalar @served, scalar @shares,
	"every new name from $other looked up once and served during the flood")
	or diag(join "\n", map { "@$_ lookups " . ($count{$_->[2]} // 0) } @shares);
cmp_ok($flooder, '<=', $client_bound,
	sprintf('the flooding address got at most its share: %d lookups in %.2f s',
		$flooder, $f->{time}));

###############################################################################
