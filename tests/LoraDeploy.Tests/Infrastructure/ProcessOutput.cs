using System.Diagnostics;
using System.Text;
using System.Text.RegularExpressions;

namespace LoraDeploy.Tests;

/// <summary>
/// A started child process's stdout and stderr, kept for failure messages, and the address it prints once it listens.
/// Test servers bind a port the system picks and say which: a port found free beforehand can be taken by another
/// test's server before this one binds it.
/// </summary>
public sealed class ProcessOutput
{
    private readonly Process _process;
    private readonly StringBuilder _text = new();
    private readonly Regex _listeningLine;
    private readonly Func<Match, Uri> _address;
    private readonly TaskCompletionSource<Uri> _listening = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <param name="listeningLine">The line the process prints once it listens.</param>
    /// <param name="address">Its address, from that line's match.</param>
    public ProcessOutput(Process process, Regex listeningLine, Func<Match, Uri> address)
    {
        _process = process;
        _listeningLine = listeningLine;
        _address = address;
        process.OutputDataReceived += (_, e) => Append(e.Data);
        process.ErrorDataReceived += (_, e) => Append(e.Data);
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
    }

    public string Text
    {
        get
        {
            lock (_text)
            {
                return _text.ToString();
            }
        }
    }

    /// <summary>Where the process listens, once it has said so; fails when it exits first or stays silent for <paramref name="timeout"/>.</summary>
    public async Task<Uri> ListeningAsync(string name, TimeSpan timeout)
    {
        using var silence = new CancellationTokenSource(timeout);
        try
        {
            var first = await Task.WhenAny(_listening.Task, _process.WaitForExitAsync(silence.Token)).WaitAsync(silence.Token);
            if (first == _listening.Task)
            {
                return await _listening.Task;
            }
        }
        catch (OperationCanceledException)
        {
            throw new TimeoutException($"{name} did not say where it listens within {timeout}:\n{Text}");
        }
        throw new InvalidOperationException($"{name} exited with {_process.ExitCode}:\n{Text}");
    }

    private void Append(string? line)
    {
        if (line is null)
        {
            return;
        }
        lock (_text)
        {
            _text.AppendLine(line);
        }
        if (!_listening.Task.IsCompleted && _listeningLine.Match(line) is { Success: true } listening)
        {
            _listening.TrySetResult(_address(listening));
        }
    }
}
