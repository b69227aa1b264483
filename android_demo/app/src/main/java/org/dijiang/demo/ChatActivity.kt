package org.dijiang.demo

import android.app.Activity
import android.content.Intent
import android.os.Bundle
import android.view.Gravity
import android.view.View
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import org.dijiang.demo.core.DemoConfig
import org.dijiang.demo.core.EndReason
import org.dijiang.demo.core.TokenRate
import org.dijiang.demo.core.TurnResult
import java.io.File
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/**
 * The chat screen. All model work runs on one worker thread, in order (load, turns,
 * reset, close); views are touched only on the UI thread.
 */
class ChatActivity : Activity() {
    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    private lateinit var store: SettingsStore
    private lateinit var status: TextView
    private lateinit var messages: LinearLayout
    private lateinit var scroll: ScrollView
    private lateinit var input: EditText
    private lateinit var send: Button
    private lateinit var newChat: Button

    private var config: DemoConfig? = null
    @Volatile private var loaded: LoadedModel? = null
    private var generating = false
    private var lastRate: Double? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_chat)
        padForSystemBars(findViewById(R.id.root))
        store = SettingsStore(this)
        status = findViewById(R.id.status)
        messages = findViewById(R.id.messages)
        scroll = findViewById(R.id.scroll)
        input = findViewById(R.id.input)
        send = findViewById(R.id.send)
        newChat = findViewById(R.id.new_chat)
        send.setOnClickListener { if (generating) loaded?.session?.cancel() else sendMessage() }
        newChat.setOnClickListener { startNewChat() }
        findViewById<Button>(R.id.open_settings).setOnClickListener {
            startActivity(Intent(this, SettingsActivity::class.java))
        }
    }

    override fun onResume() {
        super.onResume()
        val fresh = store.load()
        val old = config
        config = fresh
        // Temperature and max tokens apply from the next turn; new files need a reload.
        if (!generating && (old == null || old.modelPath != fresh.modelPath || old.tokenizerPath != fresh.tokenizerPath)) {
            load(fresh)
        }
    }

    override fun onDestroy() {
        super.onDestroy()
        val m = loaded
        loaded = null
        m?.session?.cancel()
        worker.execute { m?.engine?.close() }
        worker.shutdown()
    }

    private fun load(cfg: DemoConfig) {
        val old = loaded
        loaded = null
        setBusy(true)
        messages.removeAllViews()
        status.text = getString(R.string.loading, File(cfg.modelPath).name)
        worker.execute {
            old?.engine?.close()
            val result: Any = try {
                ModelLoader.load(cfg)
            } catch (e: Exception) {
                e
            }
            runOnUiThread {
                if (result is LoadedModel) {
                    loaded = result
                    lastRate = null
                    setBusy(false)
                    updateStatus()
                } else {
                    status.text = getString(R.string.load_failed, (result as Exception).message ?: result.toString())
                }
            }
        }
    }

    private fun sendMessage() {
        val m = loaded ?: return
        val cfg = config ?: return
        val text = input.text.toString().trim()
        if (text.isEmpty()) return
        input.setText("")
        addBubble(text, fromUser = true)
        val reply = addBubble("", fromUser = false)
        val meta = addMeta()
        setGenerating(true)
        worker.execute {
            try {
                val result = m.session.send(text, cfg.maxNewTokens, cfg.temperature) { piece, rate ->
                    runOnUiThread {
                        reply.append(piece)
                        if (rate != null) lastRate = rate
                        updateStatus()
                        scrollToEnd()
                    }
                }
                runOnUiThread { showTurn(result, meta) }
            } catch (e: Exception) {
                runOnUiThread {
                    meta.text = getString(R.string.turn_failed, e.message ?: e.toString())
                    setGenerating(false)
                    updateStatus()
                }
            }
        }
    }

    private fun showTurn(result: TurnResult, meta: TextView) {
        result.decodeTokensPerSecond?.let { lastRate = it }
        meta.text = getString(
            R.string.turn_meta,
            result.stats.promptTokens + result.stats.generatedTokens,
            TokenRate.format(result.decodeTokensPerSecond),
            TokenRate.format(result.stats.prefillTokensPerSecond),
            describe(result.endReason)
        )
        setGenerating(false)
        updateStatus()
        scrollToEnd()
    }

    private fun startNewChat() {
        val m = loaded ?: return
        if (generating) return
        messages.removeAllViews()
        lastRate = null
        worker.execute {
            m.session.reset()
            runOnUiThread { updateStatus() }
        }
    }

    private fun updateStatus() {
        val m = loaded ?: return
        val state = m.stateSize?.let { getString(R.string.state_known, it.describe()) }
            ?: getString(R.string.state_unknown)
        status.text = getString(R.string.status_line, state, m.session.position, TokenRate.format(lastRate))
    }

    private fun setGenerating(on: Boolean) {
        generating = on
        send.setText(if (on) R.string.stop else R.string.send)
        newChat.isEnabled = !on
    }

    private fun setBusy(busy: Boolean) {
        send.isEnabled = !busy
        newChat.isEnabled = !busy
    }

    private fun addBubble(text: String, fromUser: Boolean): TextView {
        val pad = dp(10)
        val view = TextView(this).apply {
            this.text = text
            setPadding(pad, pad, pad, pad)
            setBackgroundResource(if (fromUser) R.drawable.bubble_user else R.drawable.bubble_assistant)
            setTextIsSelectable(true)
            textSize = 16f
        }
        val params = LinearLayout.LayoutParams(
            LinearLayout.LayoutParams.WRAP_CONTENT, LinearLayout.LayoutParams.WRAP_CONTENT
        ).apply {
            gravity = if (fromUser) Gravity.END else Gravity.START
            topMargin = dp(8)
            if (fromUser) marginStart = dp(48) else marginEnd = dp(48)
        }
        messages.addView(view, params)
        scrollToEnd()
        return view
    }

    private fun addMeta(): TextView {
        val view = TextView(this).apply {
            textSize = 12f
            setTextColor(getColor(R.color.meta_text))
            setPadding(dp(4), dp(2), 0, 0)
        }
        messages.addView(view)
        return view
    }

    private fun describe(reason: EndReason): String = when (reason) {
        EndReason.EOS -> "end of turn"
        EndReason.MAX_TOKENS -> "max tokens"
        EndReason.CANCELLED -> "stop"
        EndReason.CONTEXT_FULL -> "full context (start a new chat)"
    }

    private fun scrollToEnd() {
        scroll.post { scroll.fullScroll(View.FOCUS_DOWN) }
    }

    private fun dp(v: Int): Int = (v * resources.displayMetrics.density).toInt()
}
